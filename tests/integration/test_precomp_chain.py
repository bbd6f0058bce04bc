"""A SCAN/VSE precomp release (region features, no images) through import -> train -> eval on Ray and MLflow."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.features import store
from pipeline.stages import run_stages

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WORDS = ["horse", "cat", "dog", "bus", "boat", "tree", "pizza", "clock", "kite", "train"]


def write_release(root, split: str, n: int, seed: int) -> None:
    """`{split}_ims.npy` (n, 36, 2048): regions carry a trace of the image's class; 5 captions naming it."""
    rng = np.random.default_rng(seed)
    classes = np.arange(n) % len(WORDS)
    regions = rng.random((n, 36, 2048), dtype=np.float32)
    regions[np.arange(n), :, classes * 7] += 3.0
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", regions)
    captions = [f"a {WORDS[c]} {adj}" for c in classes for adj in ("photo", "picture", "scene", "view", "image")]
    (root / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    (root / f"{split}_ids.txt").write_text("".join(f"{seed}{i:04d}\n" for i in range(n)))


def test_precomp_release_imports_trains_and_evaluates(ray_cluster, tracker, tmp_path):
    from tests.conftest import TINY_OVERRIDES

    root = tmp_path / "coco_precomp"
    write_release(root, "train", 120, 1)
    write_release(root, "dev", 20, 2)
    write_release(root, "testall", 30, 3)
    cfg = load_config(None, TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}", "data.source=precomp", "data.name=coco",
                                              f"data.root={root}", "train.method_args.queue_size=0"])
    results = run_stages(cfg, tracker)
    assert set(results) == {"extract", "train", "eval"} and results["extract"].stage == "import"
    split = store.read_split(*store.open_selection(results["extract"].path), "test", ("region_feats",))
    assert len(split.keys) == 30 and split.images["region_feats"].shape == (30, 36, 2048)
    metrics = json.loads((results["eval"].path / "metrics.json").read_text())
    assert metrics["num_images"] == 30 and metrics["num_captions"] == 150
    assert "frozen_rsum" not in metrics  # region means and text embeddings share no space
    run = MlflowClient(tracker.uri).get_run(results["extract"].run_id)
    assert run.data.metrics["images"] == 170 and run.data.tags["itr.stage"] == "import"
    again = run_stages(cfg, tracker, "extract")["extract"]
    assert again.cached and again.run_id == results["extract"].run_id
