"""The stages with Ray and MLflow at the edge, one module each, and the chain that runs them, declared once:

    synth -> shard -> extract [+ guide] -> train -> eval         (images: synthetic, coco, flickr30k, nuswide)
                      import            -> train -> eval         (a feature source: SCAN/VSE precomp)
             shard ----------------------> train -> eval         (a method on shards: clip_finetune)
             shard -> zero-shot                                  (`itr eval --zero-shot`)
"""
from __future__ import annotations

import dataclasses

from pipeline.config import Config
from pipeline.registry import Registry
from pipeline.stages.base import Stage, StageResult
from pipeline.stages.eval import run_eval, run_zero_shot
from pipeline.stages.extract import run_extract, run_import
from pipeline.stages.shard import run_shard
from pipeline.stages.synth import run_synth
from pipeline.stages.train import resolve_method, run_train, run_train_shards
from pipeline.tracking.runs import Tracker

LAST_STAGES = ("synth", "shard", "extract", "train", "eval")  # what `itr STAGE` may name


def _feature_source(cfg: Config) -> bool:
    from pipeline.data.sources import FEATURE_SOURCES

    return cfg.data.source in FEATURE_SOURCES


def _on_shards(cfg: Config) -> bool:
    return resolve_method(cfg.train)[0].source == "shards"


def _reads_guide(cfg: Config) -> bool:
    cls, args = resolve_method(cfg.train)
    return not _on_shards(cfg) and any(c.store == "guide" for c in cls.columns(args))


def _guide(cfg: Config, tracker: Tracker, shards: StageResult) -> StageResult:
    """The guide store: `train.guide`'s extractor over the same shards (the extract stage with that config)."""
    return run_extract(dataclasses.replace(cfg, features=cfg.train.guide), tracker, shards)


STAGES = Registry("stage", "stage")
for _stage in (
    Stage("synth", (), lambda cfg, tracker: run_synth(cfg, tracker), when=lambda cfg: cfg.data.source == "synthetic"),
    Stage("shard", (), lambda cfg, tracker, *up: run_shard(cfg, tracker, [r.run_id for r in up]),
          when=lambda cfg: not _feature_source(cfg), optional=("synth",)),
    Stage("import", (), lambda cfg, tracker: run_import(cfg, tracker), when=_feature_source),
    Stage("extract", ("shard",), run_extract, when=lambda cfg: not _feature_source(cfg)),
    Stage("guide", ("shard",), _guide, when=_reads_guide),
    Stage("train", ("extract",), run_train, when=lambda cfg: not _on_shards(cfg), optional=("guide",)),
    Stage("train-shards", ("shard",), run_train_shards, when=_on_shards),
    # eval takes (sources by stage name, train): the stages the trained method reads (extract [+ guide], or shard)
    Stage("eval", ("train",), run_eval, optional=("extract", "guide", "shard")),
    Stage("zero-shot", ("shard",), run_zero_shot),
):
    STAGES.register(_stage.name, _stage)


def plan(cfg: Config, last: str = "eval", zero_shot: bool = False) -> list[str]:
    """Returns the names of the stages that `itr LAST` runs for this config, in order. Raises ValueError for a
    chain that cannot be built (an unknown stage, a feature source asked for images, a guide store without
    `train.guide`)."""
    if last not in LAST_STAGES:
        raise ValueError(f"unknown stage {last!r} (known: {', '.join(LAST_STAGES)})")
    if last == "synth" and cfg.data.source != "synthetic":
        raise ValueError(f"itr synth needs data.source=synthetic, got {cfg.data.source!r}")
    stop = LAST_STAGES.index(last)
    feature_source = _feature_source(cfg)
    if feature_source and (zero_shot or stop < 2):
        raise ValueError(f"data.source={cfg.data.source} holds features, not images: it has no shard stage and "
                         "no zero-shot benchmark")
    names = ["synth"] if cfg.data.source == "synthetic" else []
    names += ["import"] if feature_source else ["shard"] if stop >= 1 else []
    if zero_shot:
        return names + ["zero-shot"]
    on_shards = stop >= 2 and _on_shards(cfg)
    if on_shards and feature_source:
        raise ValueError(f"train.method={cfg.train.method} trains on images: data.source={cfg.data.source} has none")
    if not feature_source and stop >= 2 and not (on_shards and stop > 2):
        names.append("extract")
    if stop >= 3 and not on_shards and _reads_guide(cfg):
        if cfg.train.guide is None:
            raise ValueError(f"train.method={cfg.train.method} reads a guide store: set train.guide (an extractor "
                             "config, e.g. {extractor: open_clip, model: ViT-B-32, pretrained: /path/to.pt})")
        if feature_source:
            raise ValueError("train.guide: a feature source has no images to extract a guide store from")
        names.append("guide")
    if stop >= 3:
        names.append("train-shards" if on_shards else "train")
    if stop >= 4:
        names.append("eval")
    return names


def run_stages(cfg: Config, tracker: Tracker, last: str = "eval", zero_shot: bool = False) -> dict[str, StageResult]:
    """Runs the chain of `plan` (earlier stages reuse their cached outputs); returns the results by stage name
    ("extract" holds the import stage's result for a feature source, "train" the train stage's either way)."""
    results: dict[str, StageResult] = {}
    for name in plan(cfg, last, zero_shot):
        stage = STAGES.get(name)
        if name == "eval":  # a method on features reads the store(s), a method on shards the tars
            sources = {k: results[k] for k in stage.optional if k in results}
            if "extract" in sources:
                sources.pop("shard", None)
            results[name] = stage.run(cfg, tracker, sources, *[results[k] for k in stage.inputs])
            continue
        args = [results[k] for k in stage.inputs] + [results[k] for k in stage.optional if k in results]
        result = stage.run(cfg, tracker, *args)
        results[{"import": "extract", "train-shards": "train"}.get(name, name)] = result
    return results
