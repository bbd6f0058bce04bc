"""SCAN / VSE++ precomputed region features, the "precomp" release (Lee et al. 2018, "Stacked Cross Attention for
Image-Text Matching", github.com/kuanghuei/SCAN: `data/coco_precomp/`, `data/f30k_precomp/`). Per split, in one
folder:

    {split}_ims.npy    float32 (N, 36, 2048): bottom-up-attention Faster R-CNN features of 36 regions per image
    {split}_caps.txt   one caption per line; image i's captions are lines k*i+1 .. k*i+k, k = lines / N (5)
    {split}_ids.txt    one id per line: per image (N lines), or per caption (k*N lines, each image's id on its k lines)

Release splits: train, dev, test and, for COCO, testall (the 5K test set). `PRECOMP_SPLITS` maps them to store
splits. There are no images, so this is not a `load_samples` source: `pipeline.features.precomp` writes
the region features straight into the feature store. Only local files are read (the array is memory-mapped).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.sample import Rejected, check_key

# release split -> store split. Where two release splits share a store split, the importer takes the first one
# present: COCO's testall (5K, what the coco-1k and coco-5k protocols evaluate) before test (1K, Flickr30K's test).
PRECOMP_SPLITS = {"train": "train", "dev": "val", "testall": "test", "test": "test"}


@dataclass
class PrecompSplit:
    """One release split. `regions` is the whole (N, R, D) array of `{split}_ims.npy`, a read-only memory map;
    the other lists have one entry per kept image, in row order: its row in `regions`, id, key
    (`{name}-{split}-{id}`) and valid captions (in file order). `rejected` lists the rejected captions and images."""

    split: str  # release split: train, dev, test, testall
    store_split: str  # PRECOMP_SPLITS[split]
    files: tuple[Path, Path, Path]  # ims.npy, caps.txt, ids.txt
    regions: np.memmap
    rows: np.ndarray  # int64
    ids: list[str]
    keys: list[str]
    captions: list[list[str]]
    rejected: list[Rejected]


def precomp_files(root: Path, split: str) -> tuple[Path, Path, Path]:
    """Returns the paths (ims.npy, caps.txt, ids.txt) of release split `split` under `root`."""
    return root / f"{split}_ims.npy", root / f"{split}_caps.txt", root / f"{split}_ids.txt"


def _lines(path: Path) -> list[bytes]:
    """Returns the raw lines of a text file split at '\\n' (one final newline ends the last line, it adds none)."""
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _text(raw: bytes, what: str) -> str:
    """Returns a line decoded and stripped; raises ValueError ("<what> is empty", "... is not UTF-8")."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 ({err})") from err
    if not text:
        raise ValueError(f"{what} is empty")
    return text


def _regions(path: Path) -> np.memmap:
    """Returns the array of an .npy file memory-mapped read-only; raises ValueError naming the file when it is not a
    C-order float array of shape (N, R, D) with N, R, D > 0."""
    try:
        regions = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as err:  # not an .npy file, a pickled or object array
        raise ValueError(f"{path}: not a memory-mappable .npy array ({err})") from err
    if regions.ndim != 3 or 0 in regions.shape or regions.dtype.kind != "f" or not regions.flags.c_contiguous:
        raise ValueError(f"{path}: expected a C-order float array of shape (images, regions, dim) such as "
                         f"(N, 36, 2048), got {regions.dtype} {regions.shape}")
    return regions


def read_precomp(root: Path, split: str, name: str = "precomp") -> PrecompSplit:
    """Returns release split `split` of the precomp folder `root`, keys `{name}-{split}-{id}`.

    Captions per image k = caption lines / array rows. The ids file holds one id per image, or one per caption (then
    image i's id is on lines k*i+1 .. k*i+k, which must agree). Rejected (a `Rejected` each, the rest kept): a caption
    that is empty or not UTF-8; an image whose id is empty, not UTF-8, makes an unsafe key or repeats an earlier
    image's id, or that is left with no valid caption. Raises FileNotFoundError naming a missing file, ValueError
    naming the file for an array of the wrong rank or shape, a caption count that is not a positive multiple of the
    rows, an ids count that is neither, or per-caption ids that disagree within an image.
    """
    root = Path(root)
    if split not in PRECOMP_SPLITS:
        raise ValueError(f"unknown precomp split {split!r} (known: {', '.join(PRECOMP_SPLITS)})")
    check_key(name)
    files = precomp_files(root, split)
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"precomp file not found: {path}")
    ims, caps, ids_file = files
    regions = _regions(ims)
    n = len(regions)
    captions = _lines(caps)
    if not captions or len(captions) % n:
        raise ValueError(f"{caps}: {len(captions)} captions for the {n} images of {ims.name}: not a whole number "
                         "(at least 1) per image")
    k = len(captions) // n
    id_lines = _lines(ids_file)
    if len(id_lines) not in (n, len(captions)):
        raise ValueError(f"{ids_file}: {len(id_lines)} ids, expected one per image ({n}, the rows of {ims.name}) "
                         f"or one per caption ({len(captions)}, the lines of {caps.name})")
    step = len(id_lines) // n
    for i in range(n if step > 1 else 0):
        group = {line.strip() for line in id_lines[i * step:(i + 1) * step]}
        if len(group) > 1:
            raise ValueError(f"{ids_file}: lines {i * step + 1}-{(i + 1) * step} (image row {i}) hold different ids "
                             f"{sorted(group)}: one id per caption must repeat its image's id")

    rows, ids, keys, kept, rejected, seen = [], [], [], [], [], {}
    for i in range(n):
        try:
            ident = _text(id_lines[i * step], "id")
            key = check_key(f"{name}-{split}-{ident}")
        except ValueError as err:
            rejected.append(Rejected(f"{ids_file.name}#{i * step + 1}", f"image row {i}: {err}"))
            continue
        if key in seen:
            rejected.append(Rejected(key, f"image row {i}: duplicate id {ident!r}, image row {seen[key]} has it too"))
            continue
        seen[key] = i
        valid = []
        for line in range(i * k, (i + 1) * k):
            try:
                valid.append(_text(captions[line], "caption"))
            except ValueError as err:
                rejected.append(Rejected(key, f"{caps.name} line {line + 1}: {err}"))
        if not valid:
            rejected.append(Rejected(key, f"image row {i} has no valid caption ({caps.name} lines "
                                          f"{i * k + 1}-{(i + 1) * k})"))
            continue
        rows.append(i)
        ids.append(ident)
        keys.append(key)
        kept.append(valid)
    return PrecompSplit(split=split, store_split=PRECOMP_SPLITS[split], files=files, regions=regions,
                        rows=np.array(rows, dtype=np.int64), ids=ids, keys=keys, captions=kept, rejected=rejected)
