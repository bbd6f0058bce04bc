"""Columnar cache of the feature store (pipeline.features.columnar): takes equal `store.read_split`, the cache is
built once (idempotent, atomic, safe under concurrent builders), an S3 store is cached locally, and mapping plus
taking rows does not grow anonymous memory by the split's size."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.features import columnar, store

META = "meta.json"  # the commit record, rewritten when columns are added
ROOT = Path(__file__).resolve().parents[2]
FIXED_IMAGE = ("image_embed", "patch_tokens", "patch_boxes")
RAGGED_IMAGE = ("roi_feats", "roi_boxes")
IMAGE_COLUMNS = FIXED_IMAGE + RAGGED_IMAGE + ("roi_count",)
CAPTION_COLUMNS = ("text_embed", "text_pooled", "text_tokens", "text_len", "caption_index")


def _shard(rng: np.random.Generator, split_dir: Path, stem: str, n: int, max_regions: int, group: int | None,
           uniform: bool = False) -> dict:
    """Writes one store shard of `n` images (0-3 captions each, 0..max_regions regions, or exactly max_regions
    when `uniform`, 0-4 tokens per caption); returns its manifest row."""
    keys = [f"{stem}-{i}" for i in range(n)]
    regions = np.full(n, max_regions) if uniform else rng.integers(0, max_regions + 1, n)
    images = store.image_table(keys, [[f"l{j}" for j in range(i % 3)] for i in range(n)], {
        "image_embed": rng.standard_normal((n, 8)),
        "patch_tokens": rng.standard_normal((n, 4, 6)),
        "patch_boxes": rng.random((n, 4, 4)),
        "roi_feats": [rng.standard_normal((m, 5)) for m in regions],
        "roi_boxes": [rng.random((m, 4)) for m in regions],
    })
    per_image = rng.integers(0, 4, n)
    per_image[0] = max(per_image[0], 1)  # at least one caption per shard
    cap_keys = [k for k, c in zip(keys, per_image) for _ in range(c)]
    cap_index = [j for c in per_image for j in range(c)]
    texts = [f"caption {j} of {k} é" for k, j in zip(cap_keys, cap_index)]
    m = len(cap_keys)
    captions = store.caption_table(cap_keys, cap_index, texts, {
        "text_embed": rng.standard_normal((m, 8)), "text_pooled": rng.standard_normal((m, 8)),
        "text_tokens": [rng.standard_normal((t, 6)) for t in rng.integers(0, 5, m)],
    })
    split = split_dir.name
    images_file, captions_file = store.write_shard(split_dir, stem, images, captions, image_row_group_size=group)
    return {"split": split, "shard": f"{split}/{stem}.tar", "shard_sha256": stem, "images_file":
            f"{split}/{images_file}", "captions_file": f"{split}/{captions_file}", "num_images": n, "num_captions": m}


@pytest.fixture(scope="module")
def feature_store(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A store of 4 train shards (one without any region, one with 3 regions on every image) and 1 val shard; the
    manifest as written."""
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    rows = [_shard(rng, root / "train", "shard-000000", 7, 3, 3),
            _shard(rng, root / "train", "shard-000001", 5, 0, None),  # no regions at all
            _shard(rng, root / "train", "shard-000002", 9, 4, 2),
            _shard(rng, root / "train", "shard-000003", 6, 3, None, uniform=True),  # 3 regions each: block gathers
            _shard(rng, root / "val", "shard-000000", 4, 2, None)]
    store.write_manifest(root, pd.DataFrame(rows))
    return root, store.read_manifest(root)


def _files(folder: Path) -> dict[str, int]:
    """Returns {path relative to folder: mtime_ns} of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_equal(split: columnar.ColumnarSplit, ref: store.FeatureSplit, seed: int = 1) -> None:
    """Asserts every opened column, keys, labels and captions of `split` equal the whole-split reader's."""
    rng = np.random.default_rng(seed)
    assert split.keys == ref.keys and split.labels == ref.labels
    assert split.num_images == len(ref.keys) and split.num_captions == len(ref.caption_text)
    np.testing.assert_array_equal(split.caption_image, ref.caption_image)
    assert split.caption_image.dtype == np.int64
    all_captions = np.arange(split.num_captions)
    assert split.caption_text(all_captions) == ref.caption_text
    for table, arrays, n in (("images", ref.images, split.num_images), ("captions", ref.captions, split.num_captions)):
        for column, expected in arrays.items():
            for rows in (rng.integers(0, n, 40), np.sort(rng.integers(0, n, 40)), np.zeros(0, np.int64),
                         np.arange(n), np.arange(n)[::-1], [n - 1, 0, n - 1]):
                got = split.take(table, column, rows)
                rows = np.asarray(rows, dtype=np.int64)
                if column not in ref.offsets:
                    assert not split.is_ragged(table, column)
                    assert got.dtype == expected.dtype and got.shape == (len(rows),) + expected.shape[1:]
                    np.testing.assert_array_equal(got, expected[rows])
                    continue
                assert split.is_ragged(table, column)
                flat, lengths = got
                offsets = ref.offsets[column]
                assert flat.dtype == expected.dtype and flat.shape[1:] == expected.shape[1:]
                np.testing.assert_array_equal(lengths, offsets[rows + 1] - offsets[rows])
                items = columnar.ragged_items(flat, lengths)
                assert len(items) == len(rows)
                for item, r in zip(items, rows):
                    np.testing.assert_array_equal(item, expected[offsets[r]:offsets[r + 1]])


def test_takes_equal_read_split(feature_store, tmp_path):
    root, manifest = feature_store
    image_columns, caption_columns = FIXED_IMAGE + RAGGED_IMAGE, ("text_embed", "text_pooled", "text_tokens")
    for split_name in ("train", "val"):
        ref = store.read_split(root, manifest, split_name, image_columns, caption_columns)
        split = columnar.open_split(root, manifest, split_name, image_columns, caption_columns, tmp_path / "cache")
        _check_equal(split, ref)
    # a selection in another order: rows follow that manifest's order, as read_split's do
    shuffled = manifest.iloc[[2, 0, 3, 1, 4]].reset_index(drop=True)
    ref = store.read_split(root, shuffled, "train", image_columns, caption_columns)
    split = columnar.open_split(root, shuffled, "train", image_columns, caption_columns, tmp_path / "cache")
    _check_equal(split, ref, seed=2)
    assert split.item_shape("images", "patch_tokens") == (4, 6) and split.item_shape("images", "roi_feats") == (5,)
    # pickled as its folders and mapped again: sending it to another process copies no array
    data = pickle.dumps(split)
    assert len(data) < 2000
    _check_equal(pickle.loads(data), ref, seed=3)


def test_scalar_columns_and_row_index(feature_store, tmp_path):
    root, manifest = feature_store
    split = columnar.open_split(root, manifest, "train", IMAGE_COLUMNS, CAPTION_COLUMNS, tmp_path)
    ref = store.read_split(root, manifest, "train", ("roi_feats",), ("text_tokens",))
    rows = np.array([3, 3, 0, split.num_images - 1])
    np.testing.assert_array_equal(split.take("images", "roi_count", rows),
                                  np.diff(ref.offsets["roi_feats"])[rows])
    cap_rows = np.arange(split.num_captions)
    np.testing.assert_array_equal(split.take("captions", "text_len", cap_rows), np.diff(ref.offsets["text_tokens"]))
    caption_index = split.take("captions", "caption_index", cap_rows)
    assert caption_index.dtype == np.int32 and caption_index.max() <= 2
    # joining a second store by sample key
    keys = [split.keys[i] for i in (5, 0, 5, 20)]
    np.testing.assert_array_equal(split.row_index(keys), [5, 0, 5, 20])
    with pytest.raises(KeyError, match="nope"):
        split.row_index([keys[0], "nope", "nope2"])
    with pytest.raises(ValueError, match="was not opened"):
        split.take("images", "image_pooled", [0])
    with pytest.raises(IndexError, match="out of range"):
        split.take("images", "image_embed", [split.num_images])
    with pytest.raises(ValueError, match="image_pooled.*is not in"):
        columnar.open_split(root, manifest, "train", ("image_pooled",), (), tmp_path)
    with pytest.raises(ValueError, match="no shard of split 'test'"):
        columnar.open_split(root, manifest, "test", (), (), tmp_path)
    with pytest.raises(FileNotFoundError, match="has no columnar cache of image_pooled"):
        columnar.map_split(split.folders, ("image_pooled",), ())
    wrong = manifest.iloc[0].copy()
    wrong["num_images"] += 1
    with pytest.raises(ValueError, match=r"shard-000000.images.parquet has 7 rows, its manifest row says 8"):
        columnar.build_cache(root, wrong, "images", ("patch_tokens",), tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        columnar.build_cache(root, {**wrong.to_dict(), "images_file": "train/gone.parquet"}, "images", (), tmp_path)


def test_cache_is_built_once_and_only_for_asked_columns(feature_store, tmp_path):
    root, manifest = feature_store
    cache = tmp_path / "cache"
    assert columnar.default_cache_root(root) == root / "columns"
    columnar.open_split(root, manifest, "train", ("image_embed", "roi_feats"), ("text_embed",), cache)
    folder = columnar.cache_folder(cache, manifest.iloc[0], "images")
    assert folder == cache / "train" / "shard-000000.images"
    names = set(os.listdir(folder))
    assert {"image_embed.npy", "roi_feats.npy", "roi_feats.offsets.npy", "key.utf8.npy", "labels.json",
            "meta.json"} <= names
    assert "patch_tokens.npy" not in names and "roi_boxes.npy" not in names
    first = _files(cache)
    assert not any(columnar._is_temp(Path(p).name) for p in first)
    columnar.open_split(root, manifest, "train", ("roi_feats", "image_embed"), ("text_embed",), cache)
    assert _files(cache) == first  # a no-op: nothing rewritten
    # another column is added later; what was cached stays as it was
    columnar.open_split(root, manifest, "train", ("patch_tokens",), (), cache)
    again = _files(cache)
    assert {p: again[p] for p in first if not p.endswith(META)} == {p: t for p, t in first.items()
                                                                     if not p.endswith(META)}
    assert "train/shard-000000.images/patch_tokens.npy" in again
    meta = json.loads((folder / "meta.json").read_text())
    assert set(meta["columns"]) == {"key", "labels", "image_embed", "roi_feats", "patch_tokens"}


def test_killed_builds_are_ignored_and_rebuilt(feature_store, tmp_path):
    root, manifest = feature_store
    cache, row = tmp_path / "cache", manifest.iloc[0]
    ref = store.read_split(root, manifest.iloc[:1], "train", ("image_embed", "roi_feats"), ())
    folder = columnar.build_cache(root, row, "images", ("image_embed",), cache)
    # a temp file of a killed build, and a column file renamed into place before the build could commit it
    (folder / ".roi_feats.npy.tmp-12345-deadbeef").write_bytes(b"partial")
    (folder / "roi_feats.npy").write_bytes(b"garbage")
    columnar.build_cache(root, row, "images", ("image_embed", "roi_feats"), cache)
    assert not (folder / ".roi_feats.npy.tmp-12345-deadbeef").exists()
    split = columnar.open_split(root, manifest.iloc[:1], "train", ("image_embed", "roi_feats"), (), cache)
    _check_equal(split, ref)
    # a first build killed before its commit record: everything there is redone
    other = columnar.cache_folder(cache, manifest.iloc[1], "images")
    other.mkdir(parents=True)
    (other / "image_embed.npy").write_bytes(b"garbage")
    (other / ".key.utf8.npy.tmp-1-x").write_bytes(b"partial")
    columnar.build_cache(root, manifest.iloc[1], "images", ("image_embed",), cache)
    assert sorted(os.listdir(other)) == sorted([".lock", "meta.json", "image_embed.npy", "key.utf8.npy",
                                                 "key.utf8.offsets.npy", "labels.json"])
    np.testing.assert_array_equal(np.load(other / "image_embed.npy"),
                                  store.read_split(root, manifest.iloc[1:2], "train", ("image_embed",), ())
                                  .images["image_embed"])


def test_concurrent_builders_build_once(feature_store, tmp_path):
    root, manifest = feature_store
    cache, go, log = tmp_path / "cache", tmp_path / "go", tmp_path / "builds.log"
    script = textwrap.dedent(f"""
        import os, sys, time
        import pandas as pd
        from pipeline.features import columnar
        manifest = pd.read_parquet({str(root / store.MANIFEST)!r})
        build = columnar._build_columns
        def logged(*args):  # records each build: with the lock, every file is built by one process only
            with open({str(log)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{args[5]}}\\n")
            return build(*args)
        columnar._build_columns = logged
        open(sys.argv[1], "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        for i in range(len(manifest)):
            for table, cols in (("images", {IMAGE_COLUMNS!r}), ("captions", {CAPTION_COLUMNS!r})):
                columnar.build_cache({str(root)!r}, manifest.iloc[i], table, cols, {str(cache)!r})
    """)
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r)], cwd=ROOT) for r in ready]
    try:
        while not all(r.exists() for r in ready):  # both have imported everything: start them together
            assert all(p.poll() is None for p in procs), "a builder died while starting"
            time.sleep(0.02)
        go.touch()
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert not [p for p in cache.rglob("*") if columnar._is_temp(p.name)]
    built = [line.split()[1] for line in log.read_text().splitlines()]
    assert sorted(built) == sorted({str(p.parent) for p in cache.rglob(META)}) and len(built) == 2 * len(manifest)
    for split_name in ("train", "val"):
        ref = store.read_split(root, manifest, split_name, FIXED_IMAGE + RAGGED_IMAGE,
                               ("text_embed", "text_pooled", "text_tokens"))
        before = _files(cache)
        split = columnar.open_split(root, manifest, split_name, FIXED_IMAGE + RAGGED_IMAGE,
                                    ("text_embed", "text_pooled", "text_tokens"), cache)
        assert _files(cache) == before  # the builders had done it all
        _check_equal(split, ref)


def test_cache_root_of_a_uri_store_is_local_per_store(monkeypatch, tmp_path):
    monkeypatch.setenv("ITR_CACHE_DIR", str(tmp_path))
    a = columnar.default_cache_root("s3://bucket/features/coco/abc")
    assert a.parent == tmp_path / "columns" and len(a.name) == 16
    assert columnar.default_cache_root("s3://bucket/features/coco/abc/") == a
    assert columnar.default_cache_root("s3://bucket/features/coco/abd") != a
    monkeypatch.delenv("ITR_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert columnar.default_cache_root("s3://bucket/x").parent == tmp_path / "home" / ".cache" / "itr" / "columns"


def test_s3_store_reads_through_pyarrow_into_a_local_cache(feature_store, tmp_path, monkeypatch, s3_server):
    import pyarrow.fs as pafs

    root, manifest = feature_store
    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir("columnar")
    pafs.copy_files(str(root), "columnar/store", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    monkeypatch.setenv("ITR_CACHE_DIR", str(tmp_path))
    uri = "s3://columnar/store"
    split = columnar.open_split(uri, manifest, "train", FIXED_IMAGE + RAGGED_IMAGE, ("text_tokens",))
    _check_equal(split, store.read_split(root, manifest, "train", FIXED_IMAGE + RAGGED_IMAGE, ("text_tokens",)))
    assert (columnar.default_cache_root(uri) / "train" / "shard-000000.images" / "roi_feats.npy").is_file()


RSS_SCRIPT = """
import json, sys
import numpy as np
import pandas as pd
from pipeline.features import columnar

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

root, cache = sys.argv[1], sys.argv[2]
manifest = pd.read_parquet(root + "/manifest.parquet")
before = rss_anon()
split = columnar.open_split(root, manifest, "train", ("region_feats",), ("text_embed",), cache)
rng = np.random.default_rng(0)
taken = []
for _ in range(10):
    rows = rng.integers(0, split.num_images, 100)
    taken.append(split.take("images", "region_feats", rows))
    assert (taken[-1][:, 0, 0] == (rows % 1000)).all()
print(json.dumps({"grown": rss_anon() - before, "taken": sum(t.nbytes for t in taken)}))
"""


@pytest.mark.slow
def test_mapping_and_taking_does_not_load_the_split(tmp_path):
    """About 200 MB of float16 region features: building the cache, mapping it and taking 1,000 rows grows the
    process's anonymous memory by far less than that."""
    root, n, shards, shape = tmp_path / "store", 5000, 4, (10, 512)
    rows = []
    for s in range(shards):
        keys = [f"s{s}-{i}" for i in range(n)]
        value = (np.arange(s * n, (s + 1) * n) % 1000).astype(np.float16)
        regions = np.empty((n,) + shape, np.float16)
        regions[:] = value[:, None, None]
        images = store.image_table(keys, [[] for _ in keys], {"region_feats": regions})
        del regions
        captions = store.caption_table(keys, [0] * n, ["a caption"] * n,
                                       {"text_embed": np.ones((n, 4)), "text_pooled": np.ones((n, 4))})
        files = store.write_shard(root / "train", f"shard-{s:06d}", images, captions, image_row_group_size=100)
        del images
        rows.append({"split": "train", "shard": f"train/shard-{s:06d}.tar", "shard_sha256": str(s),
                     "images_file": f"train/{files[0]}", "captions_file": f"train/{files[1]}", "num_images": n,
                     "num_captions": n})
    store.write_manifest(root, pd.DataFrame(rows))
    size = n * shards * int(np.prod(shape)) * 2
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(root), str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (tmp_path / "cache" / "train" / "shard-000003.images" / "region_feats.npy").stat().st_size > size / shards
    assert result["taken"] == 1000 * int(np.prod(shape)) * 2
    assert result["grown"] < size / 5, f"RssAnon grew by {result['grown'] / 2**20:.0f} MiB for a {size / 2**20:.0f} " \
                                        "MiB split"
