"""The synth stage: the built-in synthetic dataset."""
from __future__ import annotations

import time

from pipeline.config import Config, to_dict
from pipeline.fingerprint import digest
from pipeline.stages.base import StageResult, _cached, _commit, log
from pipeline.tracking.runs import Tracker, stage_run


def run_synth(cfg: Config, tracker: Tracker) -> StageResult:
    """Generates the synthetic dataset into `cfg.data_root` unless the same one is already there."""
    import mlflow

    from pipeline.data.sources import synthetic

    params = to_dict(cfg.data.synth)
    fp = digest({"synth": synthetic.fingerprint_params(params), "code": synthetic.CODE_VERSION})
    root = cfg.data_root
    if hit := _cached(tracker, "synth", fp, root, []):
        return hit
    with stage_run(tracker, "synth", fp, {"data": to_dict(cfg.data)}, []) as run_id:
        t0 = time.perf_counter()
        summary = synthetic.generate(root, **params)
        mlflow.log_metrics({"images": sum(summary["counts"].values()), "captions": summary["num_captions"],
                            "seconds": time.perf_counter() - t0})
        for name in ("synth.json", "ceiling.json", "preview.png"):
            if (root / name).is_file():
                mlflow.log_artifact(str(root / name))
        log(f"synth: {summary['counts']} images at {root}")
        return _commit(root, "synth", fp, run_id, {"counts": summary["counts"]})
