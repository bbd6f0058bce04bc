"""Content fingerprints: the identity of a stage's output (inputs + config + code version)."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd


def digest(obj: Any, length: int = 16) -> str:
    """Returns a hex sha256 prefix of `obj` serialised as canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def frame_digest(df: pd.DataFrame, length: int = 16) -> str:
    """Returns a content hash of a DataFrame (values and column names, order-sensitive)."""
    h = hashlib.sha256(",".join(map(str, df.columns)).encode())
    h.update(pd.util.hash_pandas_object(df.astype(str), index=False).values.tobytes())
    return h.hexdigest()[:length]
