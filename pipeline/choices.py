"""Every value of a config that names one of a fixed set of choices, checked before any work starts: registry
names (`data.source`, `features.extractor` and the extractors of `train.guide` and `eval.zero_shot`,
`train.method`, `compare.methods`) and enumerations (`features.precision` of every extractor, `eval.protocol`,
`train.lr_schedule`). Cheap: the registries list their names without importing the modules behind them."""
from __future__ import annotations

from pipeline.config import PROTOCOL_SIZES, Config, ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "step")


def _one_of(key: str, value: str, known) -> None:
    if value not in known:
        raise ConfigError(f"{key}: expected one of {', '.join(known)}, got {value!r}")


def _registered(registry, key: str, value: str) -> None:
    if value not in registry:
        raise ConfigError(f"{key}: unknown {registry.kind} {value!r} (known: {', '.join(registry.names())})")


def check_choices(cfg: Config) -> None:
    """Raises ConfigError naming the first key whose value is not one of its choices (with the known ones)."""
    from pipeline.data.sources import SOURCES
    from pipeline.features.extractors import EXTRACTORS
    from pipeline.methods import METHODS

    _registered(SOURCES, "data.source", cfg.data.source)
    extractors = [("features", cfg.features)] + ([("train.guide", cfg.train.guide)] if cfg.train.guide else [])
    extractors += [(f"eval.zero_shot[{i}]", fc) for i, fc in enumerate(cfg.eval.zero_shot)]
    for key, fc in extractors:
        _registered(EXTRACTORS, f"{key}.extractor", fc.extractor)
        _one_of(f"{key}.precision", fc.precision, PRECISIONS)
    _registered(METHODS, "train.method", cfg.train.method)
    for i, name in enumerate(getattr(getattr(cfg, "compare", None), "methods", []) or []):
        _registered(METHODS, f"compare.methods[{i}]", name)
    _one_of("eval.protocol", cfg.eval.protocol, tuple(PROTOCOL_SIZES))
    _one_of("train.lr_schedule", cfg.train.lr_schedule, LR_SCHEDULES)
