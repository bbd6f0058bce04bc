"""The eval stage (the trained method on `eval.split`) and the zero-shot benchmark."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import storage
from pipeline.config import Config, RerankConfig, to_dict
from pipeline.fingerprint import digest
from pipeline.io import atomic_dir
from pipeline.stages.base import StageResult, _commit, log
from pipeline.stages.extract import run_extract
from pipeline.stages.train import load_trained
from pipeline.tracking.runs import Tracker, metric_names, stage_run


def open_eval_inputs(method, sources: dict[str, StageResult], split: str):
    """Returns the inputs of the trained `method` over `split`: its store columns (`sources["extract"]`, and
    `sources["guide"]` when it reads one) or, for a method on shards, the split's tars (`sources["shard"]`)."""
    from pipeline.features import store
    from pipeline.train.inputs import ShardInputs, open_feature_inputs

    if method.source == "shards":
        from pipeline.data.shard import read_manifest

        manifest = read_manifest(sources["shard"].path)
        paths = [str(storage.join(sources["shard"].path, s)) for s in manifest[manifest["split"] == split]["shard"]]
        if not paths:
            raise ValueError(f"eval split {split!r} has no shard")
        return ShardInputs(paths, method.preprocess, method.tokenizer)
    guide = store.open_selection(sources["guide"].path) if "guide" in sources else None
    return open_feature_inputs(type(method), method.args, *store.open_selection(sources["extract"].path), split,
                               guide)


def frozen_reference(sources: dict[str, StageResult], split: str):
    """Returns the extractor's own (image, caption) global embeddings of `split` when they share a space (the
    "frozen features" reference row), else None (an imported region set has no joint space; a method on shards
    has no store)."""
    from pipeline.features import store

    if "extract" not in sources:
        return None
    feats = store.read_split(*store.open_selection(sources["extract"].path), split, ("image_embed",),
                             ("text_embed",))
    reference = (feats.images["image_embed"], feats.captions["text_embed"])
    return reference if reference[0].shape[1] == reference[1].shape[1] else None


@torch.no_grad()
def two_stage_eval(method, inputs, img: torch.Tensor, txt: torch.Tensor, ec) -> tuple[dict, tuple]:
    """Returns (the two-stage metrics, (i2t ranks, t2i ranks)) of a method with `rerank` over the whole split
    (whatever `eval.protocol`): each query's global top-k (`eval.rerank_k`: i2t, t2i; 0 keeps that direction
    one-stage) rescored by `method.rerank(inputs, direction, rows, candidates)`; a query whose positive is not
    among its candidates is a miss. Adds `{dir}_candidate_recall` (percent of queries with a positive among the
    candidates) and `seconds` (the ranking and rescoring, embedding excluded)."""
    from pipeline.eval.metrics import positive_index, recall_metrics, retrieval_ranks, two_stage_ranks

    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    i2t_pos, t2i_pos = positive_index(inputs.caption_image, len(img))
    one = retrieval_ranks(img, txt, inputs.caption_image, ec.chunk_size) if min(ec.rerank_k.i2t, ec.rerank_k.t2i) <= 0 \
        else None
    t0 = time.perf_counter()
    ranks, extra = {}, {}
    for i, (direction, queries, gallery, positives, k) in enumerate((
            ("i2t", img, txt, i2t_pos, ec.rerank_k.i2t), ("t2i", txt, img, t2i_pos, ec.rerank_k.t2i))):
        if k <= 0:
            ranks[direction] = one[i]
            continue
        k = min(k, len(gallery))
        ranks[direction] = two_stage_ranks(
            queries, gallery, positives, k, lambda rows, cand, d=direction: method.rerank(inputs, d, rows, cand),
            ec.chunk_size)
        extra[f"{direction}_candidate_recall"] = float(100.0 * np.mean(ranks[direction] < k))
    metrics = recall_metrics(ranks["i2t"], ranks["t2i"], ec.ks)
    return {**metrics, **extra, "seconds": time.perf_counter() - t0}, (ranks["i2t"], ranks["t2i"])


def run_eval(cfg: Config, tracker: Tracker, sources: dict[str, StageResult], trained: StageResult) -> StageResult:
    """Evaluates the trained method (global embeddings, and its two-stage rerank when it has one) and, as a
    reference row, the frozen extractor's own global embeddings on `eval.split`; writes metrics.json, table.md
    and recall.png under `<workdir>/eval/<fingerprint>`. `sources`: the upstream results by stage name that the
    method reads (extract [and guide], or shard)."""
    import mlflow

    from pipeline.eval.report import evaluate_split, write_report
    from pipeline.train.inputs import embed_inputs

    ec = cfg.eval
    method = load_trained(trained.path)
    inputs = open_eval_inputs(method, sources, ec.split)
    source_fps = {name: r.fingerprint for name, r in sources.items()}
    fp = digest({"train": trained.fingerprint, "features": source_fps, "eval": to_dict(ec)})
    upstream = [r.run_id for r in sources.values()] + [trained.run_id]
    with stage_run(tracker, "eval", fp, {"eval": to_dict(ec)}, upstream,
                   inputs=pd.DataFrame({"key": inputs.keys}), input_name=f"{cfg.data.name}-{ec.split}",
                   input_source=str(next(iter(sources.values())).path)) as run_id:
        trained_name = f"{trained.info.get('method', 'trained')} (trained)"
        rows, ranks = {}, {}
        t0 = time.perf_counter()
        img, txt = embed_inputs(method, inputs, torch.device("cpu"))
        embed_seconds = time.perf_counter() - t0
        rows[trained_name], ranks["trained"] = evaluate_split(img, txt, inputs.caption_image, inputs.labels, ec)
        metrics = dict(rows[trained_name])
        metrics.update(embed_seconds=embed_seconds, one_stage_seconds=time.perf_counter() - t0)
        if method.rerank is not None and (ec.rerank_k.i2t > 0 or ec.rerank_k.t2i > 0):
            two, ranks["trained, two-stage"] = two_stage_eval(method, inputs, img, txt, ec)
            rows[f"{trained_name}, two-stage"] = two
            metrics.update({f"two_stage_{k}": v for k, v in two.items() if k != "seconds"})
            metrics["two_stage_seconds"] = embed_seconds + two["seconds"]  # embedding + top-k + rescoring
            log(f"eval: two-stage rsum {two['rsum']:.1f} (one-stage {metrics['rsum']:.1f}), candidate recall "
                + ", ".join(f"{k.split('_')[0]} {v:.1f}%" for k, v in two.items() if k.endswith("candidate_recall")))
        if method.rerank is not None and ec.full_rerank:
            every = RerankConfig(i2t=inputs.num_captions, t2i=inputs.num_images)  # every gallery item a candidate
            full, ranks["trained, full local"] = two_stage_eval(method, inputs, img, txt,
                                                                dataclasses.replace(ec, rerank_k=every))
            rows[f"{trained_name}, full local"] = {k: v for k, v in full.items()
                                                  if k != "seconds" and not k.endswith("candidate_recall")}
            metrics.update({f"full_local_{k}": v for k, v in rows[f"{trained_name}, full local"].items()})
            metrics["full_local_seconds"] = embed_seconds + full["seconds"]
            log(f"eval: full local scoring rsum {full['rsum']:.1f} in {full['seconds']:.1f} s")
        reference = frozen_reference(sources, ec.split)
        if reference is not None:
            rows["frozen features (untrained)"], ranks["frozen features"] = evaluate_split(
                *reference, inputs.caption_image, inputs.labels, ec)
        ceiling = synthetic_ceiling(cfg)
        if ceiling:
            rows["perfect-model ceiling"] = ceiling
        metrics.update({f"frozen_{k}": v for k, v in rows.get("frozen features (untrained)", {}).items()})
        metrics.update({f"ceiling_{k}": v for k, v in (ceiling or {}).items()})
        metrics.update(num_images=inputs.num_images, num_captions=inputs.num_captions)
        out = cfg.workdir_path / "eval" / fp
        with atomic_dir(out) as tmp:
            table = write_report(tmp, rows, ranks, metrics, ec.ks, ceiling)
        mlflow.log_metrics(metric_names(metrics))
        mlflow.log_artifacts(str(out))
        return _commit(out, "eval", fp, run_id, {"table": table, "metrics": metrics})


def synthetic_ceiling(cfg: Config) -> dict | None:
    """Returns the perfect-model R@1 of the eval split recorded by `itr synth` (None for other sources)."""
    if cfg.data.source != "synthetic":
        return None
    from pipeline.data.sources.synthetic import read_ceiling

    ceiling = read_ceiling(cfg.data_root).get(cfg.eval.split) or {}
    return {k: v for k, v in ceiling.items() if v is not None} or None


# ---------------------------------------------------------------- zero-shot benchmark
def model_label(fc) -> str:
    """Returns a short row name for an extractor config: `extractor:model:weights` (weights: the pretrained
    tag or file name; for open_clip without weights, `random-seed<N>`)."""
    weights = Path(fc.pretrained).name if fc.pretrained else ""
    if not weights and fc.extractor == "open_clip":
        weights = f"random-seed{fc.seed}"
    return ":".join(part for part in (fc.extractor, Path(fc.model).name, weights) if part)


def run_zero_shot(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """Extracts (or reuses) the features of every extractor in `eval.zero_shot` (default: `features`) and
    evaluates their own global embeddings on `eval.split` under `eval.protocol`: one table, one row per
    model, in `<workdir>/zero_shot/<fingerprint>/` and in MLflow."""
    import dataclasses

    import mlflow

    from pipeline.eval.report import evaluate_split, write_report
    from pipeline.features import store

    ec = cfg.eval
    models = ec.zero_shot or [cfg.features]
    extracted = {model_label(fc): run_extract(dataclasses.replace(cfg, features=fc), tracker, shards) for fc in models}
    fp = digest({"features": [r.fingerprint for r in extracted.values()], "eval": to_dict(ec)})
    with stage_run(tracker, "zero-shot", fp, {"eval": to_dict(ec)}, [r.run_id for r in extracted.values()]) as run_id:
        rows, ranks = {}, {}
        for name, result in extracted.items():
            split = store.read_split(*store.open_selection(result.path), ec.split, ("image_embed",), ("text_embed",))
            rows[name], ranks[name] = evaluate_split(split.images["image_embed"], split.captions["text_embed"],
                                                     split.caption_image, split.labels, ec)
            log(f"zero-shot: {name}: t2i R@1 {rows[name]['t2i_R@1']:.1f}, rsum {rows[name]['rsum']:.1f}")
        metrics = {f"{name}/{k}": v for name, m in rows.items() for k, v in m.items()}
        out = cfg.workdir_path / "zero_shot" / fp
        with atomic_dir(out) as tmp:
            table = write_report(tmp, rows, ranks, metrics, ec.ks)
        mlflow.log_metrics(metric_names(metrics))
        mlflow.log_artifacts(str(out))
        return _commit(out, "zero-shot", fp, run_id, {"table": table, "metrics": metrics})
