"""Reader for the Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`, ...).

Format: {"images": [{"filepath", "filename", "split", "sentences": [{"raw"}], "imgid", "cocoid"?}]}.
COCO's `restval` split is training data (Karpathy & Fei-Fei 2015; VSE++).
"""
from __future__ import annotations

import json
from pathlib import PurePosixPath

from pipeline import storage
from pipeline.data.sample import Rejected, Sample, check_key

SPLIT_ALIASES = {"restval": "train"}


def read_karpathy(json_path: storage.Location, image_root: storage.Location,
                  key_prefix: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (one `Sample` per well-formed image entry, keyed `{key_prefix}-{cocoid or imgid}`, image = file
    path; one `Rejected` per malformed entry: a missing field, no caption, an empty caption, an unsafe key).

    Raises FileNotFoundError or ValueError when the file itself is missing or is not a Karpathy split file.
    """
    if not storage.exists(json_path):
        raise FileNotFoundError(f"Karpathy split file not found: {json_path}")
    name = str(json_path).rstrip("/").rsplit("/", 1)[-1]
    try:
        entries = json.loads(storage.read_bytes(json_path).decode("utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"{json_path}: not a Karpathy split file ({err})") from err
    samples, rejected = [], []
    for n, entry in enumerate(entries):
        item = f"{name}#{n}"
        try:
            ident = entry.get("cocoid", entry["imgid"])
            captions = [s["raw"].strip() for s in entry["sentences"]]
            rel = PurePosixPath(entry.get("filepath", "")) / entry["filename"]
            split = SPLIT_ALIASES.get(entry["split"], entry["split"])
            key = check_key(f"{key_prefix}-{ident}")
        except (KeyError, TypeError, AttributeError) as err:
            rejected.append(Rejected(item, f"malformed image entry (missing or wrong {err})"))
            continue
        except ValueError as err:
            rejected.append(Rejected(item, str(err)))
            continue
        if not captions or not all(captions):
            rejected.append(Rejected(key, f"{item} ({rel}) has no caption or an empty caption"))
            continue
        samples.append(
            Sample(
                key=key,
                image=str(storage.join(image_root, *rel.parts)),
                captions=captions,
                split=split,
                meta={"imgid": entry.get("imgid"), "filename": entry["filename"], "source_id": ident},
            )
        )
    return samples, rejected
