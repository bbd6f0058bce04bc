"""NUS-WIDE (Chua et al. 2009) in its release layout, and the NUS-WIDE-10k selection (Feng et al. 2014).

Layout under the dataset root (`<root>/Flickr/...` are the images, the rest comes from the release zips):

    Concepts81.txt                          the 81 concept names, one per line (or ConceptsList/Concepts81.txt)
    ImageList/Imagelist.txt                 one image path per line, Windows style: `actor\\0001_2124494179.jpg`
    ImageList/TrainImagelist.txt            the official split (optional, both or neither)
    ImageList/TestImagelist.txt
    Groundtruth/AllLabels/Labels_<c>.txt    one 0/1 line per image list line, for each concept c
    NUS_WID_Tags/All_Tags.txt               one line per image list line: `<photo id>      tag1 tag2 ...`
    Flickr/<image path, / separated>        e.g. Flickr/actor/0001_2124494179.jpg

A path may carry the release's absolute prefix (`C:\\ImageData\\Flickr\\actor\\...`): everything up to the
last `Flickr` folder is dropped. The photo id is the number after the `_` of the file name. Each image is
one sample, keyed `{name}-{photo id}`, whose single caption is its tags joined by spaces (the text side of
cross-modal retrieval on NUS-WIDE) and whose labels are its concepts. Nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data.sample import Rejected, Sample, check_key

CONCEPT_FILES = ("Concepts81.txt", "ConceptsList/Concepts81.txt")
IMAGE_LIST = "ImageList/Imagelist.txt"
SPLIT_LISTS = {"train": "ImageList/TrainImagelist.txt", "test": "ImageList/TestImagelist.txt"}
LABEL_DIR = "Groundtruth/AllLabels"
TAGS_FILE = "NUS_WID_Tags/All_Tags.txt"
IMAGE_DIR = "Flickr"
SEED = 0  # the fallback train/test split and the NUS-WIDE-10k selection
TEST_FRACTION = 107_859 / 269_648  # the official test share, used when the official lists are absent
NUSWIDE10K_CONCEPTS = 10
NUSWIDE10K_PER_CONCEPT = 1000


def _read_lines(path: Path) -> list[str]:
    """Returns the stripped lines of a UTF-8 text file, trailing blank lines dropped (blank lines inside are
    kept, so line n stays entry n); raises FileNotFoundError or ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"NUS-WIDE file not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").split("\n")]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _concepts(root: Path) -> list[str]:
    """Returns the concept names of `Concepts81.txt` (at the root or under `ConceptsList/`), in file order."""
    for name in CONCEPT_FILES:
        if (root / name).is_file():
            return [c for c in _read_lines(root / name) if c]
    raise FileNotFoundError(f"NUS-WIDE file not found: {root / CONCEPT_FILES[0]} (nor {root / CONCEPT_FILES[1]})")


def _relative_path(listed: str) -> str | None:
    """Returns the `/`-separated image path under `Flickr/` of an image list line, None when it is empty or
    leaves that folder (an absolute path without a `Flickr` folder, a `..`)."""
    parts = listed.replace("\\", "/").split("/")
    if "Flickr" in parts:
        parts = parts[len(parts) - parts[::-1].index("Flickr"):]
    if not parts or any(p in ("", ".", "..") or ":" in p for p in parts):
        return None
    return "/".join(parts)


def _label_lists(root: Path, concepts: list[str], count: int) -> list[list[str]]:
    """Returns, for each of the `count` image list lines, its concepts (in `concepts` order); raises
    FileNotFoundError naming a missing label file, ValueError naming one of the wrong length or content."""
    labels: list[list[str]] = [[] for _ in range(count)]
    for concept in concepts:
        path = root / LABEL_DIR / f"Labels_{concept}.txt"
        flags = _read_lines(path)
        if len(flags) != count:
            raise ValueError(f"{path}: {len(flags)} lines, but the image list has {count}")
        for n, flag in enumerate(flags):
            if flag == "1":
                labels[n].append(concept)
            elif flag != "0":
                raise ValueError(f"{path}: line {n + 1} is {flag!r}, expected 0 or 1")
    return labels


def read_concept_labels(root: str | Path) -> dict[str, list[str]]:
    """Returns {image file name (no folder): [concepts it is labelled with, in Concepts81.txt order]} from the
    NUS-WIDE label files."""
    root = Path(root)
    names = [line.replace("\\", "/").rsplit("/", 1)[-1] for line in _read_lines(root / IMAGE_LIST)]
    return dict(zip(names, _label_lists(root, _concepts(root), len(names))))


def _official_splits(root: Path) -> dict[str, str] | None:
    """Returns {image path under Flickr/: "train" or "test"} from the official lists (a path in both maps to
    "both"), None when neither list exists; raises FileNotFoundError naming the one missing of the two."""
    present = {split: (root / rel).is_file() for split, rel in SPLIT_LISTS.items()}
    if not any(present.values()):
        return None
    splits: dict[str, str] = {}
    for split, rel in SPLIT_LISTS.items():
        for line in _read_lines(root / rel):  # raises for the missing one
            path = _relative_path(line)
            if path is not None:
                splits[path] = "both" if splits.get(path, split) != split else split
    return splits


def _tag_lines(root: Path, count: int) -> list[bytes]:
    """Returns the stripped byte lines of All_Tags.txt; raises FileNotFoundError or ValueError (not one line per
    image list line) naming the file."""
    path = root / TAGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"NUS-WIDE file not found: {path}")
    lines = [line.strip() for line in path.read_bytes().split(b"\n")]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != count:
        raise ValueError(f"{path}: {len(lines)} lines, but the image list has {count}")
    return lines


def _line_sample(root: Path, name: str, n: int, line: str, tag_line: bytes, labels: list[str],
                 official: dict[str, str] | None, seen: dict[str, int]) -> Sample | Rejected:
    """Returns the sample of image list line `n` (split "train" when `official` is None), or why it cannot be
    one; records its key in `seen` (key -> line) once the key is valid and new."""
    item = f"{Path(IMAGE_LIST).name}#{n}"
    path = _relative_path(line)
    if path is None:
        return Rejected(item, f"image path {line!r} is empty or not under {IMAGE_DIR}/")
    folder, _, filename = path.rpartition("/")
    stem = Path(filename).stem
    photo_id = stem.rpartition("_")[2] if "_" in stem else ""
    if not photo_id:
        return Rejected(item, f"file name {filename!r} has no photo id after '_'")
    try:
        key = check_key(f"{name}-{photo_id}")
    except ValueError as err:
        return Rejected(item, str(err))
    if key in seen:
        return Rejected(item, f"duplicate key {key!r}: photo {photo_id} is already at line {seen[key]}")
    seen[key] = n
    tags_name = Path(TAGS_FILE).name
    try:
        fields = tag_line.decode("utf-8").split()
    except UnicodeDecodeError as err:
        return Rejected(key, f"{tags_name} line {n} is not UTF-8 ({err})")
    if not fields or fields[0] != photo_id:
        return Rejected(key, f"{tags_name} line {n} is for photo {fields[0] if fields else 'nothing'}, "
                             f"{item} for photo {photo_id}")
    if len(fields) == 1:
        return Rejected(key, f"photo {photo_id} has no tags ({tags_name} line {n}): empty caption")
    split = official.get(path, "neither") if official is not None else "train"
    if split in ("neither", "both"):
        lists = "neither TrainImagelist.txt nor" if split == "neither" else "both TrainImagelist.txt and"
        return Rejected(key, f"{path} is in {lists} TestImagelist.txt")
    return Sample(key=key, image=str(root / IMAGE_DIR / path), captions=[" ".join(fields[1:])], split=split,
                  labels=labels, meta={"photo_id": photo_id, "filename": filename, "filepath": folder})


def _read_release(root: Path, name: str) -> tuple[list[Sample], list[tuple[Rejected, list[str]]]]:
    """Returns (samples, [(rejected line, its concepts)]) of the whole image list, as `load_samples` describes."""
    listed = _read_lines(root / IMAGE_LIST)
    labels = _label_lists(root, _concepts(root), len(listed))
    tag_lines = _tag_lines(root, len(listed))
    official = _official_splits(root)
    samples, rejected, seen = [], [], {}
    for n, (line, tag_line, image_labels) in enumerate(zip(listed, tag_lines, labels), start=1):
        result = _line_sample(root, name, n, line, tag_line, image_labels, official, seen)
        if isinstance(result, Rejected):
            rejected.append((result, image_labels))
        else:
            samples.append(result)
    if official is None:
        ordered = sorted(samples, key=lambda s: s.key)
        for i in np.random.default_rng(SEED).permutation(len(ordered))[:round(len(ordered) * TEST_FRACTION)]:
            ordered[i].split = "test"
    return samples, rejected


def load_samples(root: Path, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected) of the whole of NUS-WIDE: one `Sample` per image list line, keyed
    `{name}-{photo id}`, image = `<root>/Flickr/<path>`, captions = [its tags joined by spaces], labels = its
    concepts, meta = {"photo_id", "filename", "filepath"}; one `Rejected` per line that cannot be a sample
    (unusable path or photo id, unsafe or duplicate key, tag line not UTF-8, for another photo, or without
    tags, an image in neither or both official lists).

    Split: `train`/`test` from the official TrainImagelist.txt/TestImagelist.txt; the release has no
    validation set, so `val` stays empty (the official test set stays comparable across papers). Without
    both lists, a seeded (SEED) random split with the official test share (40%) over the samples in key order.
    Raises FileNotFoundError naming a missing layout file, ValueError naming a label or tag file whose line
    count differs from the image list's.
    """
    samples, rejected = _read_release(root, name)
    return samples, [r for r, _ in rejected]


def select_nuswide10k(samples: list[Sample], seed: int = SEED,
                      per_concept: int = NUSWIDE10K_PER_CONCEPT) -> list[Sample]:
    """Returns the NUS-WIDE-10k selection of NUS-WIDE `samples` (new `Sample`s; the inputs are not changed).

    The 10 concepts with the most labelled samples (ties by name); the samples carrying exactly one of them
    (other concepts allowed); `min(per_concept, smallest such pool)` of them per concept drawn by
    `numpy.random.default_rng(seed)`; each concept's draw cut 80/10/10 into train/val/test (stratified:
    `max(1, n // 10)` each for val and test, the rest train, so 800/100/100 at full size). A selected
    sample's labels become [its concept] (relevance for mAP is the class), its concepts move to
    meta["concepts"]. Raises ValueError when there are fewer than 10 concepts or a pool has under 3 samples.
    """
    counts = Counter(label for s in samples for label in s.labels)
    if len(counts) < NUSWIDE10K_CONCEPTS:
        raise ValueError(f"NUS-WIDE-10k needs {NUSWIDE10K_CONCEPTS} labelled concepts, the samples have {len(counts)}")
    top = sorted(counts, key=lambda c: (-counts[c], c))[:NUSWIDE10K_CONCEPTS]
    pools: dict[str, list[Sample]] = {c: [] for c in top}
    for s in sorted(samples, key=lambda s: s.key):
        mine = [c for c in s.labels if c in pools]
        if len(mine) == 1:
            pools[mine[0]].append(s)
    smallest = min(top, key=lambda c: len(pools[c]))
    n = min(per_concept, len(pools[smallest]))
    if n < 3:
        raise ValueError(f"NUS-WIDE-10k: concept {smallest!r} has {n} samples carrying no other of the 10 largest "
                         "concepts, at least 3 are needed")
    held = max(1, n // 10)
    rng = np.random.default_rng(seed)
    selected = []
    for concept in top:
        drawn = [pools[concept][i] for i in rng.choice(len(pools[concept]), size=n, replace=False)]
        for i, s in enumerate(drawn):
            split = "test" if i < held else "val" if i < 2 * held else "train"
            selected.append(dataclasses.replace(s, split=split, labels=[concept],
                                                meta={**s.meta, "concepts": list(s.labels)}))
    return selected


def load_nuswide10k(root: Path, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (samples, rejected): the NUS-WIDE-10k selection (`select_nuswide10k` with SEED, 10 x 1,000
    images split 8,000/1,000/1,000 at full size) of the NUS-WIDE samples under `root`, keyed `{name}-{photo id}`,
    and the rejected image list lines that would have been candidates (labelled with exactly one of the 10
    selected concepts); the other rejected lines are outside the selection. The official lists are not used."""
    samples, rejected = _read_release(root, name)
    selected = select_nuswide10k(samples)
    concepts = {s.labels[0] for s in selected}
    return selected, [r for r, labels in rejected if len(concepts.intersection(labels)) == 1]
