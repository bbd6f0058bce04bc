"""Retrieval methods by name (timm-style registry): `create_method(name, **kwargs)`.

A method is an `nn.Module` with `encode_image(batch)`, `encode_text(batch)` -> L2-normalised (B, D),
`forward(batch)` -> {"image", "text"} embeddings (what DDP wraps), `score(img, txt)` -> (N, M) similarities,
and `loss(out, batch, state)` -> {"loss", named parts}. `image_inputs` / `text_inputs` name the feature
store columns it reads, concatenated in that order into batch["image"] / batch["text"].
"""
from __future__ import annotations

from typing import Callable

from torch import nn

METHODS: dict[str, Callable[..., nn.Module]] = {}


def register_method(name: str):
    """Class decorator: registers a method under `name`."""
    def wrap(cls):
        METHODS[name] = cls
        return cls
    return wrap


def create_method(name: str, **kwargs) -> nn.Module:
    """Returns a new method instance registered under `name`."""
    if name not in METHODS:
        raise ValueError(f"train.method: unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name](**kwargs)


from pipeline.methods import infonce, vse  # noqa: E402,F401  (registers)
