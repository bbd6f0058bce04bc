"""Shared fixtures: one local Ray cluster (2 CPUs) for the session, MLflow on sqlite in a temp dir,
a tiny synthetic dataset and the micro open_clip config."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ports import free_ports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


# S3 goes to the loopback S3 server of the `s3_server` fixture, never to AWS, with throwaway credentials. Set
# before the Ray fixture starts, so that Ray's worker processes inherit it. (This module is imported twice, as
# `conftest` and as `tests.conftest`: both must agree on the port.)
S3_ENDPOINT = os.environ.setdefault("ITR_TEST_S3_ENDPOINT", f"http://127.0.0.1:{free_ports(1)[0]}")  # once per session
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                  AWS_ENDPOINT_URL_S3=S3_ENDPOINT, AWS_ENDPOINT_URL=S3_ENDPOINT)

TINY_OVERRIDES = [
    "data.synth.num_train=240", "data.synth.num_val=40", "data.synth.num_test=60", "data.synth.image_size=32",
    "data.synth.max_objects=2", "shard.shard_size=100", "features.model=itr-vit-micro-32",
    "features.batch_size=64", "train.epochs=2", "train.batch_size=64", "train.method_args.hidden_dim=128",
    "train.method_args.embed_dim=64", "train.method_args.queue_size=256", "train.warmup_steps=5",
    "train.system_metrics_seconds=0.5",
]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray with 2 CPUs, shared by every integration test."""
    import ray

    from pipeline.ray_runtime import free_port

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(), log_to_driver=False, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback (the endpoint of `S3_ENDPOINT`); yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(S3_ENDPOINT.rsplit(":", 1)[1]), verbose=False)
    server.start()
    import time
    import urllib.request

    for _ in range(100):  # start() returns before the server listens
        try:
            urllib.request.urlopen(S3_ENDPOINT, timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    yield S3_ENDPOINT
    server.stop()


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI (for child processes), and a config's default
    tracking URI reads that variable: it is cleared before and after every test (so also before the next module's
    fixtures), and no test or fixture writes into an earlier test's store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def tracker(tmp_path):
    """An MLflow tracker on sqlite in a temp dir."""
    from pipeline.tracking.runs import open_tracker

    return open_tracker(f"sqlite:///{tmp_path}/mlflow.db", "test")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A tiny synthetic dataset (240/40/60 images at 32 px)."""
    from pipeline.data.sources import synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    synthetic.generate(root, seed=0, num_train=240, num_val=40, num_test=60, image_size=32, max_objects=2,
                       progress=False)
    return root


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, str]:
    """model_type -> folder of a tiny random CLIP / ALIGN / AltCLIP / GroupViT checkpoint (built once)."""
    from tests.hf_checkpoints import build_checkpoints

    return build_checkpoints(tmp_path_factory.mktemp("hf"))
