"""A method's inputs over one split: batches collated from the memory-mapped feature store (or, for a method on
shards, decoded from the tars), the same for training, validation, eval and the methods' hooks.

`FeatureInputs` reads only the rows it is asked for from the columnar cache of the store
(`pipeline.features.columnar`: .npy files mapped without copying), so a worker holds its batches, never the
split. Fixed columns become (B, D) tensors in the store's dtype (float16: a method converts on its device);
ragged ones (regions with boxes, text tokens) are padded to the batch's largest count, capped by the method
(`max_regions`, `max_tokens`), with a mask; a column of the `guide` store is joined by sample key.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipeline.methods.base import Column


def pad_ragged(values: np.ndarray, lengths: np.ndarray, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (padded (B, N, W), mask (B, N) bool) of B items given as flat `values` (sum n_i, W) and `lengths`
    (B,): item i's first min(n_i, cap) rows, zeros after them, in the values' dtype (float16 from the store: the
    method or autocast converts on its device); N = the largest kept count (at least 1, so an all-empty batch
    keeps its shape); mask[i, j] is True for a real row. One vectorised gather, no per-item loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    kept = np.minimum(lengths, cap) if cap else lengths
    b, n, width = len(lengths), max(1, int(kept.max()) if len(kept) else 1), values.shape[1]
    if len(kept) and (kept == n).all() and (lengths == n).all():  # every item full: a reshape
        return torch.from_numpy(np.ascontiguousarray(values).reshape(b, n, width)), torch.ones(b, n, dtype=torch.bool)
    starts = np.cumsum(lengths) - lengths
    item = np.repeat(np.arange(b), kept)
    position = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
    out = np.zeros((b, n, width), dtype=values.dtype)
    out[item, position] = values[np.repeat(starts, kept) + position]
    mask = np.zeros((b, n), dtype=bool)
    mask[item, position] = True
    return torch.from_numpy(out), torch.from_numpy(mask)


class FeatureInputs:
    """The inputs of a method over one split: `images(rows)`, `captions(rows)` and `batch(caption_rows)` return
    batch dicts (numpy rows copied, tensors on the CPU). `main`: the split of the main store (a `ColumnarSplit`),
    `guide`: the same split of the guide store or None, `caps`: cap per ragged column name."""

    def __init__(self, columns: list[Column], main, guide=None, caps: dict[str, int | None] | None = None):
        self.columns = columns
        self.main, self.guide = main, guide
        self.caps = caps or {}
        self.keys, self.labels = main.keys, main.labels
        self.caption_image = main.caption_image
        self.num_images, self.num_captions = main.num_images, main.num_captions
        self.guide_rows = guide.row_index(main.keys) if guide is not None else None
        if any(c.store == "guide" for c in columns) and guide is None:
            raise ValueError("the method reads columns of a guide store: set train.guide (a second extractor)")
        if any(c.store == "guide" and c.table != "images" for c in columns):
            raise ValueError("a guide store is joined by image key: only its image columns can be read")

    def _read(self, table: str, rows: np.ndarray) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for col in (c for c in self.columns if c.table == table):
            split, where = (self.guide, self.guide_rows[rows]) if col.store == "guide" else (self.main, rows)
            if col.kind == "text":
                batch[col.batch_key] = split.caption_text(where)
            elif col.kind == "ragged":
                padded, mask = pad_ragged(*split.take(table, col.name, where), self.caps.get(col.name))
                batch[col.batch_key] = padded
                if col.mask:
                    batch[col.mask] = mask
            else:
                batch[col.batch_key] = torch.from_numpy(np.ascontiguousarray(split.take(table, col.name, where)))
        return batch

    def images(self, rows: np.ndarray) -> dict[str, Any]:
        """Returns the image columns of image rows `rows` (B,)."""
        return self._read("images", np.asarray(rows, dtype=np.int64))

    def captions(self, rows: np.ndarray) -> dict[str, Any]:
        """Returns the caption columns of caption rows `rows` (B,)."""
        return self._read("captions", np.asarray(rows, dtype=np.int64))

    def batch(self, caption_rows: np.ndarray) -> dict[str, Any]:
        """Returns a training batch of caption rows, taken in ascending row order (the loss does not depend on
        the order within a batch; rows sorted by shard are gathered straight into place): their columns, their
        images' columns and "ids" (B,) = the row of each caption's image (captions of one image are positives of
        each other's image)."""
        caption_rows = np.sort(np.asarray(caption_rows))
        owner = self.caption_image[caption_rows]
        return {**self.images(owner), **self.captions(caption_rows), "ids": torch.from_numpy(owner.astype(np.int64))}


def method_caps(method_cls, args) -> dict[str, int | None]:
    """Returns {store column: cap} of the method's ragged columns (the method argument each names)."""
    return {c.name: getattr(args, c.cap) for c in method_cls.columns(args) if c.kind == "ragged" and c.cap}


def open_feature_inputs(method_cls, args, store, manifest, split: str, guide: tuple | None = None) -> FeatureInputs:
    """Returns the `FeatureInputs` of `split` for a method: `store`, `manifest` of the main store selection and,
    when the method reads guide columns, `guide` = (store, manifest) of the guide store."""
    from pipeline.features.columnar import open_split

    columns = method_cls.columns(args)

    def columns_of(store_name: str, table: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.name for c in columns if c.store == store_name and c.table == table
                                   and c.kind != "text"))

    main = open_split(store, manifest, split, columns_of("main", "images"), columns_of("main", "captions"))
    guide_split = None
    if any(c.store == "guide" for c in columns):
        if guide is None:
            raise ValueError(f"{method_cls.name} reads a guide store: set train.guide (a second extractor)")
        guide_split = open_split(*guide, split, columns_of("guide", "images"), columns_of("guide", "captions"))
    return FeatureInputs(columns, main, guide_split, method_caps(method_cls, args))


def to_device(batch: dict, device: torch.device) -> dict:
    """Returns the batch with its tensors on `device` (other values unchanged)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Yields the items of `items` produced by a background thread up to `depth` ahead (reads and collation
    overlap the training step; numpy and the memory-mapped reads release the GIL). An exception in the thread is
    raised here; leaving the loop early stops the thread."""
    if depth <= 0:
        yield from items
        return
    done = object()
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=produce, daemon=True, name="itr-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@torch.no_grad()
def embed_inputs(method, inputs, device: torch.device, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (image embeddings (N, D), caption embeddings (M, D)) of every row of `inputs`, on the CPU; the
    method is put back in its previous train/eval mode."""
    was_training = method.training
    method.eval()
    img = [method.encode_image(to_device(inputs.images(np.arange(s, min(s + batch_size, inputs.num_images))),
                                         device)).float().cpu() for s in range(0, inputs.num_images, batch_size)]
    txt = [method.encode_text(to_device(inputs.captions(np.arange(s, min(s + batch_size, inputs.num_captions))),
                                        device)).float().cpu() for s in range(0, inputs.num_captions, batch_size)]
    method.train(was_training)
    return torch.cat(img), torch.cat(txt)


class ShardInputs:
    """The inputs of a method on shards (`source = "shards"`) over one split, from its tars in order: images(rows)
    -> {"pixels" (B, 3, H, W)} decoded with `preprocess`, captions(rows) -> {"tokens" (B, L)} from `tokenizer`."""

    def __init__(self, shard_paths: list[str], preprocess, tokenizer):
        from pipeline.data.shard import read_shard

        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.jpgs, self.keys, self.labels, self.texts, owner = [], [], [], [], []
        for path in shard_paths:
            for s in read_shard(path):
                owner += [len(self.keys)] * len(s["json"]["captions"])
                self.texts += list(s["json"]["captions"])
                self.jpgs.append(s["jpg"])
                self.keys.append(s["key"])
                self.labels.append(s["json"].get("labels", []))
        self.caption_image = np.asarray(owner, dtype=np.int64)
        self.num_images, self.num_captions = len(self.keys), len(self.texts)

    def images(self, rows: np.ndarray) -> dict[str, Any]:
        from pipeline.train.end_to_end import decode_images

        return {"pixels": decode_images([self.jpgs[i] for i in rows], self.preprocess)}

    def captions(self, rows: np.ndarray) -> dict[str, Any]:
        return {"tokens": self.tokenizer([self.texts[i] for i in rows])}
