"""`itr`: run the pipeline or one stage of it from an experiment YAML.

    itr run jobs/configs/demo.yaml                 every stage, cached ones reused
    itr extract jobs/configs/demo.yaml features.batch_size=128
    itr synth|shard|extract|train|eval CONFIG [key.sub=value ...]
    itr eval --zero-shot CONFIG                    eval.zero_shot extractors, one table, no training

`itr STAGE` runs that stage and whatever it needs upstream (reusing cached outputs), under one MLflow
parent run. Exit status: 0 done, 1 the run failed, 2 bad configuration or input, 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config, to_dict

COMMANDS = {
    "synth": "generate the built-in synthetic dataset (Karpathy JSON + NUS-WIDE-style labels)",
    "shard": "write the dataset as deterministic WebDataset tars with Ray Data",
    "extract": "extract CLIP features of every shard into the feature store (Ray Data actor pool)",
    "train": "train the configured method with Ray Train (DDP, synchronised momentum queues)",
    "eval": "evaluate the trained method: R@K both directions, metrics.json and recall plot",
    "run": "run every stage, reusing cached outputs",
}


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser with one sub-command per stage plus `run`."""
    parser = argparse.ArgumentParser(prog="itr", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="experiment YAML (see jobs/configs/)")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
        if name == "eval":
            p.add_argument("--zero-shot", action="store_true",
                           help="benchmark the extractors of eval.zero_shot (default: features) zero-shot: "
                                "one table of R@K (and mAP@k on labelled sets) per model, no training")
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


def execute(command: str, cfg: Config, zero_shot: bool = False) -> dict:
    """Runs `command` (a stage name or `run`) and returns the stage results by name."""
    from pipeline.data.sources import check_source
    from pipeline.ray_runtime import ray_session
    from pipeline.stages import plan, run_stages
    from pipeline.tracking.runs import open_tracker, pipeline_run

    last = "eval" if command == "run" else command
    if cfg.data.source != "synthetic":
        check_source(cfg.data.source, cfg.data_root)  # fail before starting Ray
    plan(cfg, last, zero_shot)  # the method and its arguments too: an unknown one fails here, before Ray
    tracker = open_tracker(cfg.tracking_uri, cfg.tracking.experiment)
    with pipeline_run(tracker, f"itr {command}", to_dict(cfg)):
        if last == "synth":
            return run_stages(cfg, tracker, last)
        with ray_session(cfg.ray):
            return run_stages(cfg, tracker, last, zero_shot=zero_shot)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_workdir(cfg)
        results = execute(args.command, cfg, getattr(args, "zero_shot", False))
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
