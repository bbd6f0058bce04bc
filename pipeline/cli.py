"""`itr`: run the pipeline or one stage of it from an experiment YAML.

    itr run jobs/configs/demo.yaml                 every stage, cached ones reused
    itr extract jobs/configs/demo.yaml features.batch_size=128
    itr synth|shard|extract|train|eval CONFIG [key.sub=value ...]
    itr eval --zero-shot CONFIG                    eval.zero_shot extractors, one table, no training
    itr search CONFIG "a red circle" [--image X]   text -> images (image -> captions) with the trained model
    itr serve CONFIG [--port 8765]                 the same as a search page on http://127.0.0.1:PORT
    itr lineage [RUN_ID | latest] [--config C]     from an eval run back to the shards, with MLflow links
    itr export CONFIG --format clip-retrieval      embeddings + metadata as clip-retrieval / autofaiss read them
    itr config CONFIG [key.sub=value ...]          print the resolved configuration as YAML
    itr compare jobs/configs/compare-synth.yaml    every method of compare.methods and the zero-shot models, one
                                                   table (markdown, CSV, bar plot) on one protocol
    itr submit CONFIG workdir=/shared/itr          the same as a Ray job on a running cluster (--stage, --address,
                                                   --no-wait; --logs JOB, --stop JOB): see docs/cluster.md

`itr STAGE` runs that stage and whatever it needs upstream (reusing cached outputs), under one MLflow
parent run. Exit status: 0 done, 1 the run failed, 2 bad configuration or input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import yaml

from pipeline import __version__
from pipeline.choices import check_choices
from pipeline.config import Config, ConfigError, load_config, to_dict
from pipeline.tracking.runs import parent_run_name

COMMANDS = {
    "synth": "generate the built-in synthetic dataset (Karpathy JSON + NUS-WIDE-style labels)",
    "shard": "write the dataset as deterministic WebDataset tars with Ray Data",
    "extract": "extract CLIP features of every shard into the feature store (Ray Data actor pool)",
    "train": "train the configured method with Ray Train (DDP, synchronised momentum queues)",
    "eval": "evaluate the trained method: R@K both directions, metrics.json and recall plot",
    "run": "run every stage, reusing cached outputs",
    "compare": "train (or reuse) and evaluate every method of compare.methods and the zero-shot models of "
               "eval.zero_shot on the same features and protocol: one table, CSV and bar plot",
}


# Commands that use the results, each in its own module with `add_arguments(parser)` and `main(args) -> int`.
TOOLS = {
    "search": ("pipeline.search", "find the images that match a text (or the captions of an image) with the trained "
                                  "model"),
    "serve": ("pipeline.serve", "serve a search page on 127.0.0.1: thumbnails, scores, captions, MLflow links"),
    "lineage": ("pipeline.tracking.lineage", "walk from an eval run back to the shards: runs, fingerprints, "
                                             "datasets, folders, MLflow links"),
    "export": ("pipeline.export", "export embeddings and metadata in clip-retrieval's layout (autofaiss reads it)"),
}


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser with one sub-command per stage plus `run`."""
    parser = argparse.ArgumentParser(prog="itr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"itr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="experiment YAML (see jobs/configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        if name == "eval":
            p.add_argument("--zero-shot", action="store_true",
                           help="benchmark the extractors of eval.zero_shot (default: features) zero-shot: "
                                "one table of R@K (and mAP@k on labelled sets) per model, no training")
    from pipeline.submit import add_arguments

    help_text = "submit the pipeline (or --stage STAGE) as a Ray job to a running cluster; --logs JOB, --stop JOB"
    add_arguments(sub.add_parser("submit", help=help_text, description=help_text))
    for name, (module, help_text) in TOOLS.items():
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    p = sub.add_parser("config", help="print the resolved configuration (YAML, overrides applied, defaults filled in)",
                       description="print the resolved configuration (YAML, overrides applied, defaults filled in)")
    p.add_argument("config", help="experiment YAML (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def check_workdir(cfg: Config) -> Path:
    """Returns the workdir after checking it can be created and written; raises ConfigError otherwise."""
    path = cfg.workdir_path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"workdir {path} is not writable: {err.strerror}") from err
    return path


def mlflow_ui_command(uri: str) -> str:
    """Returns the shell command that browses the tracking store on 127.0.0.1."""
    if uri.startswith("sqlite:///"):
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        mlflow_cmd = mlflow_bin if mlflow_bin.exists() else "mlflow"
        return f"{mlflow_cmd} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} (tracking server)"


def execute(command: str, cfg: Config, zero_shot: bool = False, name: str | None = None) -> dict:
    """Runs `command` (a stage name or `run`) under a parent run named `name` (default `itr COMMAND`) and returns
    the stage results by name; a chain that evaluated a trained method registers it as an MLflow model."""
    from pipeline.data.sources import check_source
    from pipeline.ray_runtime import ray_session
    from pipeline.stages import plan, run_stages
    from pipeline.tracking.model import register_results
    from pipeline.tracking.runs import open_tracker, pipeline_run

    last = "eval" if command == "run" else command
    if cfg.data.source != "synthetic":
        check_source(cfg.data.source, cfg.data_root)  # fail before starting Ray
    plan(cfg, last, zero_shot)  # the method and its arguments too: an unknown one fails here, before Ray
    tracker = open_tracker(cfg.tracking_uri, cfg.tracking.experiment)
    with pipeline_run(tracker, name or f"itr {command}", to_dict(cfg)):
        if last == "synth":
            return run_stages(cfg, tracker, last)
        with ray_session(cfg.ray):
            results = run_stages(cfg, tracker, last, zero_shot=zero_shot)
        register_results(cfg, tracker, results)
        return results


def compare(cfg: Config) -> dict:
    """Runs `itr compare` (pipeline/compare.py) and prints its tables and files; returns no stage result."""
    from pipeline.compare import execute_compare

    result = execute_compare(cfg)
    print(result.table)
    for table in result.others.values():
        print(f"\n{table}")
    print(f"\ncompared: {result.path} ({', '.join(result.files)})")
    return {}


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra  # overrides after an option: `itr search CONFIG "text" --k 5 workdir=/tmp/w`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "submit":
        from pipeline.submit import run_command

        return run_command(args)
    try:
        if args.command in TOOLS:
            return importlib.import_module(TOOLS[args.command][0]).main(args)
        cfg = load_config(args.config, args.overrides)
        check_choices(cfg)
        if args.command == "config":
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        check_workdir(cfg)
        name = parent_run_name(args.command + (" --zero-shot" if getattr(args, "zero_shot", False) else ""),
                               args.config, args.overrides)
        results = compare(cfg) if args.command == "compare" else execute(args.command, cfg,
                                                                         getattr(args, "zero_shot", False), name)
    except KeyboardInterrupt:
        print("itr: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"itr: error: {err}", file=sys.stderr)
        return 2
    for stage in ("eval", "zero-shot"):
        if stage in results:
            print(results[stage].info["table"])
            print(f"\nmetrics: {results[stage].path / 'metrics.json'}")
    print(f"browse the runs: {mlflow_ui_command(cfg.tracking_uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
