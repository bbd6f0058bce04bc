"""Object storage: a COCO-layout dataset read from S3 and shards written to S3 (a moto S3 server on
loopback), through the shard and extract stages on Ray: the same bytes as a local run; Ray Train checkpoints
on S3."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.data.shard import read_manifest
from pipeline.features import store
from pipeline.stages import run_stages

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _coco_layout(synth_root, folder):
    """The synthetic set in the COCO Karpathy layout: `dataset_coco.json` + `images/*.jpg`."""
    folder.mkdir(parents=True)
    shutil.copy(synth_root / "dataset_synthetic.json", folder / "dataset_coco.json")
    shutil.copytree(synth_root / "images", folder / "images")
    return folder


def _bucket(name: str):
    """Returns the S3 filesystem after creating bucket `name` on the test server."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir(name)
    return fs


def test_dataset_and_shards_on_s3_match_a_local_run(ray_cluster, tracker, tmp_path, synth_root, s3_server):
    import pyarrow.fs as pafs

    from tests.conftest import TINY_OVERRIDES

    local = _coco_layout(synth_root, tmp_path / "coco")
    fs = _bucket("itr-test")
    pafs.copy_files(str(local), "itr-test/coco", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    common = TINY_OVERRIDES + ["data.source=coco", "data.name=coco", "shard.shard_size=50"]
    remote = load_config(None, common + [f"workdir={tmp_path / 'w3'}", "data.root=s3://itr-test/coco",
                                         "shard.output=s3://itr-test/shards"])
    results = run_stages(remote, tracker, "extract")
    assert results["shard"].path == "s3://itr-test/shards/coco"
    manifest = read_manifest(results["shard"].path)
    assert int(manifest["num_samples"].sum()) == 340
    assert storage.list_files("s3://itr-test/shards/coco", "test/*") == ["test/shard-000000.tar",
                                                                          "test/shard-000001.tar", "test/sizes.json"]
    # the same dataset from a local folder into a local shard folder: byte-identical tars
    reference = run_stages(load_config(None, common + [f"workdir={tmp_path / 'w'}", f"data.root={local}"]),
                           tracker, "shard")["shard"]
    local_manifest = read_manifest(reference.path)
    assert list(local_manifest["sha256"]) == list(manifest["sha256"])
    for name in manifest["shard"]:
        assert storage.read_bytes(f"s3://itr-test/shards/coco/{name}") == (reference.path / name).read_bytes()
    # extraction read every tar from S3 in the Ray workers
    split = store.read_split(*store.open_selection(results["extract"].path), "test")
    assert len(split.keys) == 60 and len(split.caption_image) == 300
    # a rerun against S3 finds nothing new
    again = run_stages(remote, tracker, "shard")["shard"]
    assert again.cached and again.run_id == results["shard"].run_id
    record = json.loads(storage.read_bytes("s3://itr-test/shards/coco/stage.json"))
    assert record["run_id"] == results["shard"].run_id


def test_training_checkpoints_on_s3(ray_cluster, tracker, tmp_path, s3_server):
    """Ray Train's storage_path on S3: checkpoints land in the bucket and the stage loads the best one from it."""
    from tests.conftest import TINY_OVERRIDES

    _bucket("itr-ckpt")
    local = load_config(None, TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}"])
    remote = load_config(None, TINY_OVERRIDES + [f"workdir={tmp_path / 'w'}", "train.storage_path=s3://itr-ckpt/runs"])
    trained = run_stages(remote, tracker, "train")["train"]
    assert not (tmp_path / "w" / "ray_results").exists()
    checkpoints = storage.list_files(f"s3://itr-ckpt/runs/train-{trained.fingerprint}", "checkpoint_*/state.pt")
    assert len(checkpoints) == 2  # one per epoch, num_to_keep=2
    assert (trained.path / "model.pt").is_file()
    assert trained.fingerprint == run_stages(local, tracker, "train")["train"].fingerprint  # where is not what
