"""SCAN / VSE++ precomp release: reader on fixtures in the upstream layout, import into the feature store, incremental
reruns, and bounded memory while importing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.data.sample import Rejected
from pipeline.data.sources.precomp import read_precomp
from pipeline.features import precomp, store
from pipeline.features.precomp import import_precomp

REPO = Path(__file__).resolve().parents[2]
DIM = 16  # fake text feature size

# 4 images x 5 captions: image 1 loses an empty and a non-UTF-8 line, image 2 has no valid caption at all
CAPTIONS = [
    b"a man rides a horse", b"a person on a horse", b"horse and rider", b"a brown horse", b"riding outdoors",
    b"a cat on a sofa", b"", b"a sleeping cat", b"a caf\xe9 sofa", b"a grey cat",
    b"", b"   ", b"\xff\xfe", b"", b"\t",
    b"two dogs play", b"dogs in a park", b"a dog with a ball", b"two puppies", b"dogs running on grass",
]


def regions_of(n: int, seed: int) -> np.ndarray:
    """Non-negative float32 (n, 36, 2048) features, like the ReLU outputs of the release."""
    return np.random.default_rng(seed).random((n, 36, 2048), dtype=np.float32) * 4


def write_split(root: Path, split: str, regions: np.ndarray, captions: list[bytes], ids: list[str]) -> None:
    """Writes one release split in the upstream layout: `{split}_ims.npy`, `{split}_caps.txt`, `{split}_ids.txt`."""
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / f"{split}_ims.npy", regions)
    (root / f"{split}_caps.txt").write_bytes(b"\n".join(captions) + b"\n")
    (root / f"{split}_ids.txt").write_text("".join(f"{i}\n" for i in ids))


def hash_encoder(calls: list) -> precomp.TextEncoder:
    """A deterministic fake text encoder: words hashed into DIM buckets; records each call's texts in `calls`."""

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        calls.append(list(texts))
        counts = np.zeros((len(texts), DIM), np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                counts[row, zlib.crc32(word.encode()) % DIM] += 1
        return {"text_embed": counts / np.linalg.norm(counts, axis=1, keepdims=True), "text_pooled": counts}

    return encode


@pytest.fixture
def release(tmp_path) -> Path:
    root = tmp_path / "coco_precomp"
    write_split(root, "train", regions_of(4, 0), CAPTIONS, ["101", "102", "103", "104"])
    write_split(root, "dev", regions_of(2, 1), [b"a red bus", b"a bus"] * 2 + [b"x"] * 6, ["201", "202"])
    write_split(root, "testall", regions_of(3, 2), [f"test caption {i}".encode() for i in range(15)],
                [str(300 + i // 5) for i in range(15)])  # one id per caption
    write_split(root, "test", regions_of(1, 3), [b"not imported"] * 5, ["399"])
    return root


def test_reader_shapes_memmap_grouping_and_rejects(release):
    split = read_precomp(release, "train", "coco")
    assert split.split == "train" and split.store_split == "train"
    assert isinstance(split.regions, np.memmap) and not split.regions.flags.writeable
    assert Path(split.regions.filename) == release / "train_ims.npy" and split.regions.shape == (4, 36, 2048)
    assert split.rows.tolist() == [0, 1, 3] and split.ids == ["101", "102", "104"]
    assert split.keys == ["coco-train-101", "coco-train-102", "coco-train-104"]
    assert split.captions == [[c.decode() for c in CAPTIONS[:5]], ["a cat on a sofa", "a sleeping cat", "a grey cat"],
                              [c.decode() for c in CAPTIONS[15:]]]
    reasons = [(r.item, r.reason.split(" (")[0]) for r in split.rejected]
    assert reasons[:2] == [("coco-train-102", "train_caps.txt line 7: caption is empty"),
                           ("coco-train-102", "train_caps.txt line 9: caption is not UTF-8")]
    assert [r.item for r in split.rejected[2:]] == ["coco-train-103"] * 6  # its 5 captions, then the image
    assert split.rejected[-1].reason == "image row 2 has no valid caption (train_caps.txt lines 11-15)"

    dev = read_precomp(release, "dev", "coco")
    assert dev.store_split == "val" and dev.keys == ["coco-dev-201", "coco-dev-202"] and len(dev.captions[0]) == 5
    per_caption_ids = read_precomp(release, "testall", "coco")
    assert per_caption_ids.ids == ["300", "301", "302"] and per_caption_ids.captions[2][0] == "test caption 10"


def test_reader_rejects_bad_ids(tmp_path):
    write_split(tmp_path, "test", regions_of(3, 0), [b"a caption"] * 9, ["7", "7", "a.b"])
    split = read_precomp(tmp_path, "test", "f30k")
    assert split.keys == ["f30k-test-7"]
    assert split.rejected == [
        Rejected("f30k-test-7", "image row 1: duplicate id '7', image row 0 has it too"),
        Rejected("test_ids.txt#3", "image row 2: sample key 'f30k-test-a.b' is not allowed: use letters, digits, "
                                   "'_' and '-' only"),
    ]


def test_reader_whole_file_errors(tmp_path):
    write_split(tmp_path, "test", regions_of(2, 0), [b"c"] * 10, ["1", "2"])
    with pytest.raises(ValueError, match="unknown precomp split 'val'"):
        read_precomp(tmp_path, "val")
    (tmp_path / "test_ids.txt").rename(tmp_path / "ids.bak")
    with pytest.raises(FileNotFoundError, match="test_ids.txt"):
        read_precomp(tmp_path, "test")
    (tmp_path / "ids.bak").rename(tmp_path / "test_ids.txt")

    (tmp_path / "test_caps.txt").write_bytes(b"c\n" * 9)
    with pytest.raises(ValueError, match=r"test_caps.txt: 9 captions for the 2 images of test_ims.npy"):
        read_precomp(tmp_path, "test")
    (tmp_path / "test_caps.txt").write_bytes(b"c\n" * 10)

    (tmp_path / "test_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(ValueError, match=r"test_ids.txt: 3 ids, expected one per image \(2.*or one per caption \(10"):
        read_precomp(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("1\n" * 4 + "9\n" + "2\n" * 5)
    with pytest.raises(ValueError, match=r"test_ids.txt: lines 1-5 \(image row 0\) hold different ids"):
        read_precomp(tmp_path, "test")
    (tmp_path / "test_ids.txt").write_text("1\n2\n")

    np.save(tmp_path / "test_ims.npy", np.zeros((2, 2048), np.float32))
    with pytest.raises(ValueError, match=r"test_ims.npy: expected .* got float32 \(2, 2048\)"):
        read_precomp(tmp_path, "test")
    (tmp_path / "test_ims.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="test_ims.npy: not a memory-mappable .npy array"):
        read_precomp(tmp_path, "test")


def stored_files(store_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(store_dir)): p.stat().st_mtime_ns for p in store_dir.rglob("*.parquet")}


def test_import_reads_back_through_the_store_and_reruns_incrementally(release, tmp_path, monkeypatch):
    monkeypatch.setattr(precomp, "GROUP_VALUES", 36 * 2048)  # one image per Parquet row group
    calls, rejected = [], []
    store_dir = tmp_path / "store"
    manifest = import_precomp(release, "coco", store_dir, hash_encoder(calls), batch_size=3, chunk_size=2,
                              run_id="run1", rejected=rejected)
    assert manifest["shard"].tolist() == ["test/precomp-testall-000000", "test/precomp-testall-000001",
                                          "train/precomp-train-000000", "train/precomp-train-000001",
                                          "val/precomp-dev-000000"]
    assert set(manifest.columns) >= {"shard", "split", "shard_sha256", "run_id", "images_file", "captions_file",
                                     "num_images", "num_captions", "seconds"}
    assert (manifest["run_id"] == "run1").all() and manifest["num_images"].sum() == 3 + 3 + 2
    assert len(rejected) == 2 + 6 and all(r.item.startswith("coco-train-10") for r in rejected)
    assert all(len(c) <= 3 for c in calls)  # batch_size texts per call
    assert pq.ParquetFile(store_dir / manifest["images_file"][2]).num_row_groups == 2

    # readers: a selection folder, then the train split with region features
    store.write_manifest(store_dir / store.SELECTIONS / "precomp", manifest)
    root, selection = store.open_selection(store_dir / store.SELECTIONS / "precomp")
    assert root == store_dir and selection.equals(manifest)
    train = store.read_split(root, selection, "train", ("image_embed", "image_pooled", "region_feats"))
    source = np.load(release / "train_ims.npy")[[0, 1, 3]]
    assert train.keys == ["coco-train-101", "coco-train-102", "coco-train-104"]
    assert train.images["region_feats"].shape == (3, 36, 2048)
    np.testing.assert_array_equal(train.images["region_feats"], source.astype(np.float16))
    np.testing.assert_allclose(train.images["image_pooled"], source.mean(1), rtol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(train.images["image_embed"].astype(np.float32), axis=1), 1, atol=1e-3)
    assert train.caption_image.tolist() == [0] * 5 + [1] * 3 + [2] * 5
    assert train.caption_text[5:8] == ["a cat on a sofa", "a sleeping cat", "a grey cat"]
    direct = hash_encoder([])(train.caption_text)
    np.testing.assert_allclose(train.captions["text_embed"], direct["text_embed"], atol=1e-3)
    np.testing.assert_array_equal(train.captions["text_pooled"], direct["text_pooled"])
    test = store.read_split(root, selection, "test")
    assert test.keys == ["coco-testall-300", "coco-testall-301", "coco-testall-302"]  # testall, not test
    assert store.read_split(root, selection, "val").images["image_embed"].shape == (2, 2048)

    # a rerun imports nothing
    before = stored_files(store_dir)
    calls.clear()
    again = import_precomp(release, "coco", store_dir, hash_encoder(calls), chunk_size=2, run_id="run2")
    assert calls == [] and again.equals(manifest) and stored_files(store_dir) == before

    # a changed caption file re-imports that split only; the store keeps the earlier version's rows
    captions = list(CAPTIONS)
    captions[15] = b"three dogs play"
    (release / "train_caps.txt").write_bytes(b"\n".join(captions) + b"\n")
    stat = (release / "train_caps.txt").stat()
    os.utime(release / "train_caps.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = import_precomp(release, "coco", store_dir, hash_encoder(calls), chunk_size=2, run_id="run3")
    assert changed["run_id"].tolist() == ["run1", "run1", "run3", "run3", "run1"]
    assert len(store.read_manifest(store_dir)) == len(changed) + 2
    retrained = store.read_split(store_dir, changed, "train").caption_text
    assert retrained[8] == "three dogs play"
    assert sorted(t for call in calls for t in call) == sorted(retrained)  # the train split's captions only


def test_import_raises_without_any_split_or_any_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="no precomp split under"):
        import_precomp(tmp_path, "x", tmp_path / "store", hash_encoder([]))
    write_split(tmp_path, "dev", regions_of(1, 0), [b""] * 5, ["1"])
    with pytest.raises(ValueError, match="precomp split dev under .*: all 1 images rejected"):
        import_precomp(tmp_path, "x", tmp_path / "store", hash_encoder([]))


MEMORY_PROBE = """
import json, sys
import numpy as np
from pipeline.features.precomp import import_precomp

def status(field):  # bytes; VmHWM is this process's peak RSS (ru_maxrss would carry the parent's over fork + exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

def encode(texts):
    return {"text_embed": np.ones((len(texts), 8), np.float32), "text_pooled": np.ones((len(texts), 8), np.float32)}

before = status("VmRSS")
rows = import_precomp(sys.argv[1], "big", sys.argv[2], encode, batch_size=512, chunk_size=int(sys.argv[3]))
print(json.dumps({"before": before, "peak": status("VmHWM"), "images": int(rows["num_images"].sum())}))
"""


@pytest.mark.slow
def test_import_memory_stays_bounded_by_the_chunk(tmp_path):
    n, chunk = 2000, 250
    root = tmp_path / "big"
    root.mkdir()
    regions = np.lib.format.open_memmap(root / "train_ims.npy", mode="w+", dtype=np.float32, shape=(n, 36, 2048))
    for start in range(0, n, 200):
        regions[start:start + 200] = regions_of(200, start)
    regions.flush()
    array_bytes = regions.nbytes
    del regions
    (root / "train_caps.txt").write_text("".join(f"caption {i // 5} {i % 5}\n" for i in range(5 * n)))
    (root / "train_ids.txt").write_text("".join(f"{i}\n" for i in range(n)))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root), str(tmp_path / "store"), str(chunk)],
                         cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["images"] == n
    growth = result["peak"] - result["before"]
    chunk_bytes = chunk * 36 * 2048 * 2  # one chunk of float16 region features
    assert growth < 4 * chunk_bytes < array_bytes / 2, (growth, chunk_bytes, array_bytes)
    assert len(pd.read_parquet(tmp_path / "store" / store.MANIFEST)) == n // chunk
