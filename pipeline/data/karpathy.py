"""Reader for the Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`, ...).

Format: {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}], "imgid", "cocoid"?}]}.
COCO's `restval` split is training data (Karpathy & Fei-Fei 2015; VSE++).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.sample import Sample, check_key

SPLIT_ALIASES = {"restval": "train"}


def read_karpathy(json_path: str | Path, image_root: str | Path, key_prefix: str) -> list[Sample]:
    """Returns one `Sample` per image entry, keyed `{key_prefix}-{cocoid or imgid}`, image = file path.

    Raises ValueError naming the entry for a malformed one (missing field, no caption).
    """
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"Karpathy split file not found: {json_path}")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: not a Karpathy split file ({err})") from err
    samples = []
    for n, entry in enumerate(entries):
        try:
            ident = entry.get("cocoid", entry["imgid"])
            captions = [s["raw"].strip() for s in entry["sentences"]]
            rel = Path(entry.get("filepath", "")) / entry["filename"]
            split = SPLIT_ALIASES.get(entry["split"], entry["split"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{json_path}: image entry #{n} is malformed (missing {err})") from err
        if not captions or not all(captions):
            raise ValueError(f"{json_path}: image entry #{n} ({rel}) has an empty caption list or caption")
        samples.append(
            Sample(
                key=check_key(f"{key_prefix}-{ident}"),
                image=str(image_root / rel),
                captions=captions,
                split=split,
                meta={"imgid": entry.get("imgid"), "filename": entry["filename"], "source_id": ident},
            )
        )
    return samples
