"""NUS-WIDE release layout: `Concepts81.txt`, `ImageList/Imagelist.txt`,
`Groundtruth/AllLabels/Labels_<concept>.txt` (one 0/1 line per image list entry)."""
from __future__ import annotations

from pathlib import Path


def read_concept_labels(root: str | Path) -> dict[str, list[str]]:
    """Returns {image file name: [concepts it is labelled with]} from the NUS-WIDE label files."""
    root = Path(root)
    concepts = [c.strip() for c in (root / "Concepts81.txt").read_text().splitlines() if c.strip()]
    names = [line.strip().replace("\\", "/").rsplit("/", 1)[-1]
             for line in (root / "ImageList" / "Imagelist.txt").read_text().splitlines() if line.strip()]
    labels: dict[str, list[str]] = {name: [] for name in names}
    for concept in concepts:
        path = root / "Groundtruth" / "AllLabels" / f"Labels_{concept}.txt"
        flags = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if len(flags) != len(names):
            raise ValueError(f"{path}: {len(flags)} lines, but the image list has {len(names)}")
        for name, flag in zip(names, flags):
            if flag == "1":
                labels[name].append(concept)
    return labels
