"""`itr compare CONFIG`: every method of `compare.methods` trained (or reused from the cache) on the same features
and evaluated on one protocol, with the zero-shot models of `eval.zero_shot`, in one table.

The table (markdown, CSV and a grouped bar plot of R@K) has one row per method that exists (plus a two-stage row
for a method with `rerank`), one per zero-shot model, the perfect-model ceiling on the synthetic set, and one row
per listed method that is not implemented yet (listed as missing, not dropped). Columns: R@1/5/10 both ways,
RSUM, mAP@k and P@k on labelled sets, train time (the method's training plus the trainings it builds on, e.g.
SCL's stages 1-2), eval time (embedding and ranking the split; for a zero-shot model, ranking only: its features
come from the extract stage) and parameters.

On the synthetic set, `compare.test_styles` adds the SCL paper's robustness table: every row trained on the
configured caption style (`data.synth.caption_style`, precise by default) and tested on the test split of each
listed style (the same scenes and images, other captions: `synthetic-<style>` datasets next to the main one).
`compare.test_data` adds the transfer table: every row also tested on the `eval.split` of other datasets (their
own shards and features, the same extractors; protocol generic), e.g. the SCL paper's COCO -> Flickr8K zero-shot
transfer (Table 3).

Everything is logged under one MLflow parent run (`itr compare`): the stages of every method (cached ones as
links), its eval, and a `compare` run holding the tables and plots. Outputs: `<workdir>/compare/<fingerprint>/`.
"""
from __future__ import annotations

import csv
import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import Config, ConfigError, TrainConfig, build_dataclass, to_dict
from pipeline.fingerprint import digest
from pipeline.io import atomic_dir, atomic_write_json
from pipeline.stages.base import StageResult, log

ALIASES = {"import": "extract", "train-shards": "train"}  # stage name -> the result key of `run_stages`
UPSTREAM = ("synth", "shard", "import", "extract", "guide")  # the stages shared by every method of a comparison
TIME_COLUMNS = ("train_seconds", "eval_seconds", "params")


@dataclass
class CompareResult:
    """What `itr compare` wrote: the folder, the tables (markdown) and every row."""

    path: Path
    table: str
    rows: list[dict]
    others: dict[str, str] = field(default_factory=dict)  # robustness / transfer: their markdown tables
    files: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- configuration
def method_config(cfg: Config, name: str) -> Config:
    """Returns `cfg` for method `name`: `train` with that method, its `compare.method_args` (default: its
    defaults), no phases (its own default) and its `compare.train` overrides (ConfigError naming the key)."""
    cc = cfg.compare
    tree = {**to_dict(cfg.train), "method": name, "method_args": cc.method_args.get(name) or {}, "phases": []}
    tree.update(cc.train.get(name) or {})
    return dataclasses.replace(cfg, train=build_dataclass(TrainConfig, tree, f"compare.train.{name}"))


def shared_config(cfg: Config) -> Config:
    """Returns `cfg` with a plain method on features (infonce without queues): the chain every method shares up to
    the features, whatever `train.method` (unused by `itr compare`) says."""
    train = dataclasses.replace(cfg.train, method="infonce", method_args={"queue_size": 0}, phases=[])
    return dataclasses.replace(cfg, train=train)


def style_config(cfg: Config, style: str) -> Config:
    """Returns `cfg` for the synthetic set of caption style `style`: the same generation parameters, data.name
    `<name>-<style>` and, when data.root is set, root `<root>-<style>` (the main set when `style` is its own)."""
    data = cfg.data
    if style == data.synth.caption_style:
        return cfg
    root = f"{data.root.rstrip('/')}-{style}" if data.root else None
    synth = dataclasses.replace(data.synth, caption_style=style)
    return dataclasses.replace(cfg, data=dataclasses.replace(data, name=f"{data.name}-{style}", root=root, synth=synth))


def check_compare(cfg: Config) -> tuple[list[str], list[str]]:
    """Returns (the methods of `compare.methods` that exist, those not implemented yet), after checking, before
    Ray starts, every method's name, arguments and chain. Raises ConfigError or ValueError naming the problem."""
    from pipeline.methods import METHODS, implemented
    from pipeline.stages import plan

    cc = cfg.compare
    if not cc.methods and not cc.zero_shot:
        raise ConfigError("compare.methods: nothing to compare (no method, and compare.zero_shot is off)")
    for key in ("method_args", "train"):  # a typo would silently train with the defaults
        unknown = sorted(set(getattr(cc, key)) - set(METHODS.names()))
        if unknown:
            raise ConfigError(f"compare.{key}.{unknown[0]}: unknown method (known: {', '.join(METHODS.names())})")
    if cc.test_styles and cfg.data.source != "synthetic":
        raise ConfigError(f"compare.test_styles: caption styles exist on the synthetic set only, not on "
                          f"data.source={cfg.data.source}")
    names = [cfg.data.name, *(s.data.name for s in other_test_sets(cfg)["robustness"].values())]
    for i, data in enumerate(cc.test_data):
        if data.name in names:
            raise ConfigError(f"compare.test_data[{i}].name: {data.name!r} is taken (the names of the datasets "
                              f"compared: {', '.join(names)})")
        names.append(data.name)
    present, missing = [], []
    for name in dict.fromkeys(cc.methods):
        if name not in METHODS:
            raise ConfigError(f"compare.methods: unknown method {name!r} (known: {', '.join(METHODS.names())})")
        if name not in implemented():
            missing.append(name)
            continue
        plan(method_config(cfg, name), "eval")  # arguments, guide store, source
        present.append(name)
    return present, missing


# ---------------------------------------------------------------- running the chain once per method
def _upstream_key(cfg: Config, stage: str) -> str:
    """The identity of a shared stage's result within one comparison (the data, shard and features sections; the
    guide's extractor for the guide store)."""
    parts = [stage, cfg.data, cfg.shard, cfg.features] + ([cfg.train.guide] if stage == "guide" else [])
    return repr(parts)


def run_chain(cfg: Config, tracker, memo: dict, train: bool = True) -> dict[str, StageResult]:
    """Runs the stages `itr train` runs for `cfg` (without the train stage when `train` is False), reusing from
    `memo` the results of shared stages already run in this comparison (each runs, or logs its cached run,
    once). Returns the results by `run_stages` key (extract for an import, train for training on shards)."""
    from pipeline.stages import STAGES, plan

    results: dict[str, StageResult] = {}
    for name in plan(cfg, "train"):
        if name not in UPSTREAM and not train:
            continue
        key = _upstream_key(cfg, name)
        if name in UPSTREAM and key in memo:
            result = memo[key]
        else:
            stage = STAGES.get(name)
            args = [results[k] for k in stage.inputs] + [results[k] for k in stage.optional if k in results]
            result = stage.run(cfg, tracker, *args)
            if name in UPSTREAM:
                memo[key] = result
        results[ALIASES.get(name, name)] = result
    return results


def eval_sources(results: dict[str, StageResult]) -> dict[str, StageResult]:
    """The stages a trained method reads at eval (extract [and guide], or the shards for a method on shards)."""
    sources = {k: results[k] for k in ("extract", "guide", "shard") if k in results}
    if "extract" in sources:
        sources.pop("shard", None)
    return sources


def train_seconds(client, run_id: str) -> float | None:
    """Returns the `train_seconds` of train run `run_id` plus those of the train runs it builds on (its
    `itr.upstream` train runs, e.g. SCL's stages 1-2), from MLflow; None when the run has none."""
    run = client.get_run(run_id)
    own = run.data.metrics.get("train_seconds")
    if own is None:
        return None
    for up in filter(None, run.data.tags.get("itr.upstream", "").split(",")):
        if client.get_run(up).data.tags.get("itr.stage") == "train":
            own += train_seconds(client, up) or 0.0
    return own


def parameter_count(trained: StageResult) -> int:
    """Returns the number of parameters of the trained method (frozen ones included: what eval runs)."""
    from pipeline.stages.train import load_trained

    return int(sum(p.numel() for p in load_trained(trained.path).parameters()))


def metric_row(metrics: dict, prefix: str = "") -> dict:
    """Returns the table metrics (R@K, rsum, mAP / P@k) of an eval's metrics.json, `prefix` stripped."""
    row = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and re.match(r"(i2t|t2i)_(R|mAP|P)@\d+$|rsum$", key[len(prefix):]):
            row[key[len(prefix):]] = value
    return row


def evaluate_method(cfg: Config, tracker, sources: dict, trained: StageResult, name: str) -> list[dict]:
    """Runs the eval stage of a trained method; returns its rows (one-stage, and two-stage when it reranks)."""
    from pipeline.stages.eval import run_eval

    metrics = run_eval(cfg, tracker, sources, trained).info["metrics"]
    rows = [{"model": name, "kind": "trained", **metric_row(metrics), "eval_seconds": metrics["one_stage_seconds"]}]
    if "two_stage_rsum" in metrics:
        rows.append({"model": f"{name}, two-stage", "kind": "trained", **metric_row(metrics, "two_stage_"),
                     "eval_seconds": metrics["two_stage_seconds"]})
    return rows


def zero_shot_rows(cfg: Config, tracker, shared: dict[str, StageResult]) -> list[dict]:
    """Returns a row per model of `eval.zero_shot` (default: `features`): its own global embeddings of
    `eval.split` (extracted from `shared["shard"]`, or reused: the `features` store is `shared["extract"]`),
    evaluated under `eval.protocol`."""
    from pipeline.eval.report import evaluate_split
    from pipeline.features import store
    from pipeline.stages.eval import model_label
    from pipeline.stages.extract import run_extract

    rows = []
    for fc in cfg.eval.zero_shot or [cfg.features]:
        extracted = shared["extract"] if fc == cfg.features else run_extract(
            dataclasses.replace(cfg, features=fc), tracker, shared["shard"])
        split = store.read_split(*store.open_selection(extracted.path), cfg.eval.split, ("image_embed",),
                                 ("text_embed",))
        t0 = time.perf_counter()
        metrics, _ = evaluate_split(split.images["image_embed"], split.captions["text_embed"], split.caption_image,
                                    split.labels, cfg.eval)
        rows.append({"model": f"{model_label(fc)} (zero-shot)", "kind": "zero-shot", **metric_row(metrics),
                     "eval_seconds": time.perf_counter() - t0, "upstream": extracted.run_id})
    return rows


# ---------------------------------------------------------------- the comparison
def run_compare(cfg: Config, tracker) -> CompareResult:
    """Trains (or reuses) and evaluates every method of `compare.methods` and the zero-shot models, on the
    same features and protocol, and writes the table (and the robustness and transfer tables of
    `compare.test_styles` and `compare.test_data`) under `<workdir>/compare/<fingerprint>/`, logged as a
    `compare` run. Ray must be up and an MLflow parent run open (see `execute_compare`)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.stages.eval import synthetic_ceiling
    from pipeline.tracking.runs import metric_names, stage_run

    present, missing = check_compare(cfg)
    client = MlflowClient(tracker.uri)
    memo: dict = {}
    rows: list[dict] = []
    trained: dict[str, tuple[Config, StageResult]] = {}
    for name in present:
        cfg_m = method_config(cfg, name)
        results = run_chain(cfg_m, tracker, memo)
        trained[name] = (cfg_m, results["train"])
        extra = {"train_seconds": train_seconds(client, results["train"].run_id),
                 "params": parameter_count(results["train"]), "upstream": results["train"].run_id}
        rows += [{**row, **extra} for row in evaluate_method(cfg_m, tracker, eval_sources(results),
                                                             results["train"], name)]
    shared = run_chain(shared_config(cfg), tracker, memo, train=False)
    if cfg.compare.zero_shot and "shard" in shared:
        rows += zero_shot_rows(cfg, tracker, shared)
    elif cfg.compare.zero_shot:
        log(f"compare: data.source={cfg.data.source} holds features, not images: no zero-shot row")
    ceiling = synthetic_ceiling(cfg)
    if ceiling:
        rows.append({"model": "perfect-model ceiling", "kind": "ceiling", **ceiling})
    rows += [{"model": f"{name} (not implemented yet)", "kind": "missing"} for name in missing]

    others = {kind: tested_elsewhere(cfg, tracker, memo, trained, rows, sets)
              for kind, sets in other_test_sets(cfg).items() if sets}
    fp = digest({"rows": [r.get("upstream") for r in rows], "eval": to_dict(cfg.eval),
                 "compare": to_dict(cfg.compare), "others": {k: sorted(v) for k, v in others.items()}})
    out = cfg.workdir_path / "compare" / fp
    upstream = sorted({r["upstream"] for r in rows if r.get("upstream")})
    with stage_run(tracker, "compare", fp, {"compare": to_dict(cfg.compare), "eval": to_dict(cfg.eval)},
                   upstream):
        with atomic_dir(out) as tmp:
            table = write_table(tmp, rows, cfg.eval.ks, f"{cfg.data.name} {cfg.eval.split} ({cfg.eval.protocol})",
                                missing)
            extra = {kind: write_other_tests(tmp, kind, found, list(found)) for kind, found in others.items()}
            atomic_write_json(tmp / "compare.json", {"rows": rows, **others, "missing": missing})
        mlflow.log_metrics(metric_names({f"{safe_name(r['model'])}/{k}": v for r in rows for k, v in r.items()
                                         if isinstance(v, (int, float)) and v is not None}))
        mlflow.log_artifacts(str(out))
    files = sorted(p.name for p in out.iterdir())
    log(f"compare: {len(present)} methods, {len(missing)} missing ({', '.join(missing) or 'none'}) -> {out}")
    return CompareResult(out, table, rows, extra, files)


def other_test_sets(cfg: Config) -> dict[str, dict[str, Config]]:
    """Returns the other test sets every row is also evaluated on, by table: {"robustness": {style: cfg of the
    synthetic set of that caption style} for `compare.test_styles`, "transfer": {data.name: cfg of that dataset,
    protocol generic} for `compare.test_data`}."""
    transfer = {d.name: dataclasses.replace(cfg, data=d, eval=dataclasses.replace(cfg.eval, protocol="generic"))
                for d in cfg.compare.test_data}
    return {"robustness": {s: style_config(cfg, s) for s in cfg.compare.test_styles}, "transfer": transfer}


def tested_elsewhere(cfg: Config, tracker, memo: dict, trained: dict, rows: list[dict],
                     sets: dict[str, Config]) -> dict[str, dict]:
    """Returns {test set: {row name: metrics}}: every trained method (trained on `cfg`'s data) and zero-shot model
    evaluated on the `eval.split` of each test set of `sets` (its own shards and features, the same extractors),
    plus its perfect-model ceiling on the synthetic set. A set that is `cfg`'s own data reuses the main rows."""
    from pipeline.stages.eval import synthetic_ceiling

    out: dict[str, dict] = {}
    for label, cfg_t in sets.items():
        if cfg_t.data == cfg.data and cfg_t.eval == cfg.eval:
            out[label] = {r["model"]: metric_row(r) for r in rows if r["kind"] != "missing"}
            continue
        found: dict[str, dict] = {}
        for name, (cfg_m, result) in trained.items():
            cfg_mt = dataclasses.replace(cfg_m, data=cfg_t.data, eval=cfg_t.eval)
            sources = eval_sources(run_chain(cfg_mt, tracker, memo, train=False))
            for row in evaluate_method(cfg_mt, tracker, sources, result, name):
                found[row["model"]] = metric_row(row)
        shared = run_chain(shared_config(cfg_t), tracker, memo, train=False)
        if cfg.compare.zero_shot and "shard" in shared:
            found.update({r["model"]: metric_row(r) for r in zero_shot_rows(cfg_t, tracker, shared)})
        if ceiling := synthetic_ceiling(cfg_t):
            found["perfect-model ceiling"] = ceiling
        out[label] = found
    return out


def safe_name(name: str) -> str:
    """Returns `name` with the characters MLflow does not allow in a metric name replaced by `_`."""
    return re.sub(r"[^\w\-. /]", "_", name)


# ---------------------------------------------------------------- outputs
def metric_columns(rows: list[dict], ks) -> list[str]:
    """R@K both ways, rsum, then the mAP / P@k any row has (`pipeline.eval.report.table_columns`)."""
    from pipeline.eval.report import table_columns

    return table_columns({r["model"]: r for r in rows}, ks)


def _cell(value, column: str) -> str:
    if value is None:
        return ""
    if column == "params":
        return f"{int(value):,}"
    return f"{value:.1f}" if column != "eval_seconds" else f"{value:.2f}"


def format_rows(rows: list[dict], columns: list[str]) -> str:
    """Returns a markdown table, one row per entry (blank cells where a row lacks a value)."""
    head = {"train_seconds": "train (s)", "eval_seconds": "eval (s)", "params": "params"}
    lines = ["| model | " + " | ".join(head.get(c, c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row.get(c), c) for c in columns) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Writes the rows as CSV: model, kind, then `columns` (empty where a row lacks a value)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "kind", *columns])
        for row in rows:
            writer.writerow([row["model"], row.get("kind", ""), *("" if row.get(c) is None else row[c]
                                                                   for c in columns)])


def write_table(out: Path, rows: list[dict], ks, title: str, missing: list[str] = ()) -> str:
    """Writes table.md, table.csv and table.png (grouped bars of R@K; the `missing` methods named under it) into
    `out`; returns the markdown table."""
    columns = metric_columns(rows, ks) + list(TIME_COLUMNS)
    table = format_rows(rows, columns)
    (out / "table.md").write_text(f"# {title}\n\n{table}\n")
    write_csv(out / "table.csv", rows, columns)
    recalls = [c for c in metric_columns(rows, ks) if "_R@" in c]
    plotted = [r for r in rows if r["kind"] in ("trained", "zero-shot") and all(c in r for c in recalls)]
    note = f"not implemented yet: {', '.join(missing)}" if missing else ""
    grouped_bars(out / "table.png", {r["model"]: [r[c] for c in recalls] for r in plotted}, recalls, title, note)
    return table


OTHER_TITLES = {"robustness": "Trained on one caption style, tested on each",
                "transfer": "Trained on the main dataset, tested on other datasets (zero-shot transfer)"}


def write_other_tests(out: Path, kind: str, found: dict[str, dict], order: list[str]) -> str:
    """Writes `<kind>.md`, `<kind>.csv` and `<kind>.png` (rsum per test set) of the rows tested on other test sets
    (`kind`: robustness or transfer); returns the markdown table."""
    models = list(dict.fromkeys(m for label in order for m in found[label]))
    columns = [f"{label} {c}" for label in order for c in ("i2t_R@1", "t2i_R@1", "rsum")]
    rows = [{"model": m, "kind": "", **{f"{label} {c}": found[label].get(m, {}).get(c) for label in order
                                          for c in ("i2t_R@1", "t2i_R@1", "rsum")}} for m in models]
    table = format_rows(rows, columns)
    (out / f"{kind}.md").write_text(f"# {OTHER_TITLES[kind]}\n\n{table}\n")
    write_csv(out / f"{kind}.csv", rows, columns)
    ranked = {m: [found[label].get(m, {}).get("rsum") for label in order] for m in models}
    grouped_bars(out / f"{kind}.png", {m: v for m, v in ranked.items() if None not in v},
                 [f"{label} rsum" for label in order], f"RSUM by test set ({kind})")
    return table


def grouped_bars(path: Path, series: dict[str, list[float]], groups: list[str], title: str, note: str = "") -> None:
    """Draws one group of bars per entry of `groups`, one bar per named series (`note` under the axes), and saves
    a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 2.0 + 0.25 * len(groups) * max(1, len(series)))), 4.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, groups)
    ax.set_ylabel("%" if all("rsum" not in g for g in groups) else "RSUM")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    if note:
        ax.set_xlabel(note)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def execute_compare(cfg: Config) -> CompareResult:
    """`itr compare`: checks every method before Ray starts, then runs the comparison under one MLflow parent run
    (`itr compare`), in a Ray session (an initialised Ray is reused)."""
    from pipeline.data.sources import check_source
    from pipeline.ray_runtime import ray_session
    from pipeline.tracking.runs import open_tracker, pipeline_run

    for data in [cfg.data, *cfg.compare.test_data]:  # a missing dataset fails before Ray starts
        if data.source != "synthetic":
            check_source(data.source, dataclasses.replace(cfg, data=data).data_root)
    check_compare(cfg)
    tracker = open_tracker(cfg.tracking_uri, cfg.tracking.experiment)
    with pipeline_run(tracker, "itr compare", to_dict(cfg)), ray_session(cfg.ray):
        return run_compare(cfg, tracker)
