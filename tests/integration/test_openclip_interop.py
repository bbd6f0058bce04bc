"""Our shard tars load in open_clip_train's own webdataset pipeline (`get_data` / `get_wds_dataset`), set up the
way `open_clip_train.main` does it: args from its CLI parser, the micro model's transforms and tokenizer, its
ClipLoss. Plain Python (no Ray), CPU only, no network.

open_clip's loader never raises on a bad tar: samples it cannot group, filter or decode are dropped with a
warning, and the train epoch is cut to (or repeated up to) `--train-num-samples`. So every check compares the
exact multiset of (image, caption) pairs seen against what our writer put in the tars, and the last test proves
that broken layouts do make these checks fail.

open_clip_train's train reader crashes on webdataset >= 0.2.96, which ends every shard with an EOF marker its
grouper does not expect (open_clip#935), so the project pins webdataset 0.2.86, as open_clip[training] does."""
from __future__ import annotations

import hashlib
import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.shard import plan_shards, read_shard, write_shard
from pipeline.data.sources import synthetic
from pipeline.features.extractors.openclip import MODEL_CONFIG_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "itr-vit-micro-32"
NUM_TRAIN, NUM_VAL, SHARD_SIZE, BATCH = 40, 12, 20, 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Our writer's tars for a 40/12 synthetic set at 32 px: train in 2 shards of 20, val in 1."""
    root = tmp_path_factory.mktemp("oc") / "synthetic"
    synthetic.generate(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, num_test=1, image_size=32,
                       max_objects=2, progress=False)
    samples, rejected = synthetic.load_samples(root, "synthetic")
    assert not rejected
    out = root.parent / "shards"
    results = [write_shard(plan, out) for plan in plan_shards(samples, SHARD_SIZE)]
    assert not any(r.get("rejected") for r in results)
    assert sorted(r["row"]["shard"] for r in results) == ["test/shard-000000.tar", "train/shard-000000.tar",
                                                 "train/shard-000001.tar", "val/shard-000000.tar"]
    return out


@pytest.fixture(scope="module")
def micro_clip():
    """(open_clip module, model, preprocess_train, preprocess_val, tokenizer) for the repo's micro config,
    random init (pretrained=None), built as open_clip_train.main builds it."""
    import open_clip

    if str(MODEL_CONFIG_DIR) not in map(str, open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    torch.manual_seed(0)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        MODEL, None, precision="fp32", device="cpu", output_dict=True)
    return open_clip, model, preprocess_train, preprocess_val, open_clip.get_tokenizer(MODEL)


def _args(shards: Path, *, train: str | None = None, val: bool = True):
    """open_clip_train's args from its own CLI parser, plus the fields main sets before get_data / create_loss:
    what `init_distributed_device` sets on a single process (not called here, so that no env var can start
    torch.distributed) and `distill`."""
    from open_clip_train.params import parse_args

    flags = ["--train-data", train or f"{shards}/train/shard-{{000000..000001}}.tar",
             "--train-num-samples", str(NUM_TRAIN), "--dataset-type", "webdataset", "--batch-size", str(BATCH),
             "--workers", "0", "--model", MODEL, "--precision", "fp32", "--device", "cpu", "--seed", "0"]
    if val:
        flags += ["--val-data", f"{shards}/val/shard-000000.tar", "--val-num-samples", str(NUM_VAL)]
    args = parse_args(flags)
    args.distributed, args.world_size, args.rank, args.local_rank = False, 1, 0, 0
    args.distill = args.distill_model is not None and args.distill_pretrained is not None
    return args


def _pixel_hash(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _written(shards: Path, split: str) -> list[dict]:
    """The samples of a split as our tars hold them, in shard and member order."""
    return [s for tar in sorted((shards / split).glob("shard-*.tar")) for s in read_shard(tar)]


def _expected_pairs(shards: Path, split: str) -> Counter:
    return Counter((_pixel_hash(Image.open(io.BytesIO(s["jpg"]))), s["txt"]) for s in _written(shards, split))


def _raw_train_pairs(args, is_train: bool = True) -> tuple[Counter, int]:
    """(pair multiset, number of batches) of one epoch through get_wds_dataset with identity transforms: the
    image hashed as decoded by the loader, the text as the loader read it from `KEY.txt`."""
    from open_clip_train.data import get_wds_dataset

    info = get_wds_dataset(args, _pixel_hash, is_train=is_train, epoch=0, tokenizer=lambda text: [text])
    pairs, batches = Counter(), 0
    for images, texts in info.dataloader:
        assert len(images) == len(texts) and (len(images) == BATCH or not is_train)
        pairs.update(zip(images, texts))
        batches += 1
    return pairs, batches


def test_train_epoch_yields_every_written_pair_once(shards):
    """One train epoch is exactly our 40 (image, KEY.txt) pairs: same pixels, same caption, paired right."""
    pairs, batches = _raw_train_pairs(_args(shards, val=False))
    assert batches == NUM_TRAIN // BATCH
    assert pairs == _expected_pairs(shards, "train")


def test_get_data_with_open_clip_transforms_and_clip_loss(shards, micro_clip):
    """get_data as main calls it: shapes, token rows == tokenizer(KEY.txt), val order == key order, and one
    ClipLoss forward/backward on a train batch is finite."""
    from open_clip_train.data import get_data

    open_clip, model, preprocess_train, preprocess_val, tokenizer = micro_clip
    args = _args(shards)
    data = get_data(args, (preprocess_train, preprocess_val), epoch=0, tokenizer=tokenizer)
    ctx = model.context_length
    train = data["train"].dataloader
    assert (train.num_batches, train.num_samples) == (NUM_TRAIN // BATCH, NUM_TRAIN)

    written = {s["key"]: s["txt"] for s in _written(shards, "train")}
    expected_rows = tokenizer(list(written.values()))
    assert bool((expected_rows[:, -1] == 0).all()), "a caption fills the context: the decode check is lossy"
    rows, batches, first = [], 0, None
    for images, texts in train:
        assert images.shape == (BATCH, 3, 32, 32) and images.dtype == torch.float32
        assert texts.shape == (BATCH, ctx) and texts.dtype == torch.long
        rows += [tuple(r) for r in texts.tolist()]
        first = first or (images, texts)
        batches += 1
    assert batches == train.num_batches
    assert Counter(rows) == Counter(tuple(r) for r in expected_rows.tolist())

    # tokens decode back to our captions (open_clip lower-cases and splits punctuation off)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    decoded = Counter(tokenizer.decode([t for t in r if t not in (0, sot, eot)]).replace(" ", "") for r in rows)
    assert decoded == Counter(c.lower().replace(" ", "") for c in written.values())

    # val: no shuffle, partial last batch, our key order
    val = data["val"].dataloader
    val_texts = torch.cat([texts for _, texts in val])
    assert val.num_batches == math.ceil(NUM_VAL / BATCH)
    assert torch.equal(val_texts, tokenizer([s["txt"] for s in _written(shards, "val")]))

    loss_fn = open_clip.create_loss(args)
    assert type(loss_fn).__name__ == "ClipLoss"
    model.train()
    losses = loss_fn(**model(*first), output_dict=True)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def _members(tar_path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _rename(ext_from: str, ext_to: str):
    return lambda members: [(n[: -len(ext_from)] + ext_to if n.endswith(ext_from) else n, d) for n, d in members]


BREAKAGES = {
    "txt member renamed": _rename(".txt", ".caption"),
    "jpg member renamed": _rename(".jpg", ".jpeg.bin"),
    "dot in key": lambda members: [(n.replace("-", ".", 1), d) for n, d in members],
    "members grouped by type": lambda members: sorted(members, key=lambda m: m[0].rpartition(".")[2]),
    "json not json": lambda members: [(n, b"{" if n.endswith(".json") else d) for n, d in members],
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_layout_fails_the_checks(shards, tmp_path, breakage):
    """Control: the same samples, relaid in ways open_clip's loader cannot read, lose every pair. Read through
    the eval path: the train path's `with_epoch` loops forever over a source that yields nothing."""
    for src in sorted((shards / "train").glob("shard-*.tar")):
        dst = tmp_path / "train" / src.name
        dst.parent.mkdir(exist_ok=True)
        with tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in BREAKAGES[breakage](_members(src)):
                tar.addfile(_info(name, len(data)), io.BytesIO(data))
    args = _args(shards, val=False)
    args.val_data, args.val_num_samples = f"{tmp_path}/train/shard-{{000000..000001}}.tar", NUM_TRAIN
    pairs, batches = _raw_train_pairs(args, is_train=False)
    assert pairs != _expected_pairs(shards, "train")
    assert (pairs, batches) == (Counter(), 0)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode = size, 0o644
    return info
