"""Retrieval methods by name (timm-style registry): `create_method(name, args, dims)`.

Every method follows the contract of `pipeline.methods.base.Method` (inputs it reads, momentum state it owns,
phases, hooks, encoders and an optional rerank); `docs/methods.md` walks through writing one.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from pipeline.registry import Registry

METHODS = Registry("method", "train.method")


# Every method by name, imported on first use (workers import only the one they train). A name whose module does
# not exist yet is listed, and asking for it says it is not implemented yet.
for _name, _module in {"infonce": "infonce", "vse": "vse", "pool": "pool", "clip_finetune": "clip_finetune",
                       "user": "user", "tgdt": "tgdt", "coder": "coder", "scl": "scl",
                       "scl_text": "scl", "scl_image": "scl"}.items():
    METHODS.register(_name, f"pipeline.methods.{_module}")


def register_method(name: str):
    """Class decorator: registers a method class under `name` (also kept as `cls.name`); it replaces the lazy
    entry of its own module."""
    def wrap(cls):
        cls.name = name
        return METHODS.register(name, cls)
    return wrap


def method_class(name: str):
    """Returns the method class registered under `name`; ValueError naming the known ones for an unknown name,
    or saying that a listed method is not implemented yet."""
    try:
        return METHODS.get(name)
    except ModuleNotFoundError as err:
        module = METHODS.spec(name)
        if not isinstance(module, str) or err.name != module:
            raise
        raise ValueError(f"train.method: {name!r} is not implemented yet ({module.replace('.', '/')}.py)") from err


def implemented() -> list[str]:
    """Returns the names of the methods whose module exists."""
    return [n for n in METHODS.names() if not isinstance(METHODS.spec(n), str)
            or importlib.util.find_spec(METHODS.spec(n)) is not None]


def create_method(name: str, args: Any = None, dims: dict[str, int] | None = None):
    """Returns a new method `name` built from `args` (its Args dataclass, or a dict checked against it) and the
    input widths `dims` (batch key -> feature width)."""
    from pipeline.methods.base import parse_args

    cls = method_class(name)
    if not isinstance(args, cls.Args):
        args = parse_args(cls, args)
    return cls(args, dims or {})


