"""Retrieval methods by name (timm-style registry): `create_method(name, args, dims)`.

Every method follows the contract of `pipeline.methods.base.Method` (inputs it reads, momentum state it owns,
phases, hooks, encoders and an optional rerank); `docs/methods.md` walks through writing one.
"""
from __future__ import annotations

from typing import Any

from pipeline.registry import Registry

METHODS = Registry("method", "train.method")


def register_method(name: str):
    """Class decorator: registers a method class under `name` (also kept as `cls.name`)."""
    def wrap(cls):
        cls.name = name
        return METHODS.register(name, cls)
    return wrap


def method_class(name: str):
    """Returns the method class registered under `name` (ValueError naming the known ones otherwise)."""
    return METHODS.get(name)


def create_method(name: str, args: Any = None, dims: dict[str, int] | None = None):
    """Returns a new method `name` built from `args` (its Args dataclass, or a dict checked against it) and the
    input widths `dims` (batch key -> feature width)."""
    from pipeline.methods.base import parse_args

    cls = method_class(name)
    if not isinstance(args, cls.Args):
        args = parse_args(cls, args)
    return cls(args, dims or {})


from pipeline.methods import clip_finetune, infonce, pool, vse  # noqa: E402,F401  (registers)
