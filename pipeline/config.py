"""Typed experiment configuration: one YAML per experiment, `key.sub=value` overrides.

Every section is a dataclass; loading checks every key and every value's type and
raises `ConfigError` naming the offending key (`train.lr: expected float, got 'abc'`).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

# Evaluation protocols and the test-split size each expects (None: any); implemented in pipeline.eval.protocols.
PROTOCOL_SIZES = {"coco-1k": 5000, "coco-5k": 5000, "f30k-1k": 1000, "generic": None}
# Caption styles of the synthetic set (pipeline.data.sources.synthetic): the SCL paper's robustness experiment.
CAPTION_STYLES = ("precise", "partial", "ambiguous")


class ConfigError(ValueError):
    """A configuration key is unknown, missing or of the wrong type."""


@dataclass
class SynthConfig:
    seed: int = 0
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 500
    image_size: int = 64
    max_objects: int = 3
    caption_style: str = "precise"  # precise | partial | ambiguous: the captions only (same scenes and images)


@dataclass
class DataConfig:
    source: str = "synthetic"  # a name registered in pipeline.data.sources
    name: str = "synthetic"  # dataset name used in output paths
    root: Optional[str] = None  # dataset folder; synthetic default: <workdir>/data/<name>
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass
class ShardConfig:
    shard_size: int = 1000  # samples per tar
    jpeg_quality: int = 95  # used only when a source image is not already a JPEG
    max_quarantined: float = 0.05  # the stage fails when more than this fraction of input items is quarantined
    output: Optional[str] = None  # parent of the shard folders: a path or URI (s3://bucket/x); default <workdir>/shards


@dataclass
class FeaturesConfig:
    extractor: str = "open_clip"
    model: str = "itr-vit-tiny-64"  # open_clip model name (built-in or pipeline/features/model_configs)
    pretrained: Optional[str] = None  # open_clip tag from the local cache, a checkpoint path, or None (random init)
    seed: int = 0  # weight init seed when pretrained is None
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int = 256
    num_gpus: float = 0.0  # per extraction actor
    cpus_per_actor: int = 0  # without GPUs: CPUs (threads) per actor; 0: at most 4 actors a node (each holds a model)
    min_actors: int = 0  # bounds of the extraction actor pool; 0: sized from the cluster (docs/cluster.md)
    max_actors: int = 0
    store_tokens: bool = True  # keep patch tokens with their boxes, RoIAlign regions of object boxes, per-token text


# FeaturesConfig fields that say how an extraction runs, not what it computes: never part of a fingerprint
OPERATIONAL_FEATURES = ("batch_size", "num_gpus", "cpus_per_actor", "min_actors", "max_actors", "precision")


@dataclass
class PhaseConfig:
    """A training phase: `epochs` at `lr` (None: train.lr) training the method's modules named in `train` ("*":
    all of them); the rest is frozen."""

    name: str = "train"
    epochs: int = 1
    lr: Optional[float] = None
    train: list[str] = field(default_factory=lambda: ["*"])


@dataclass
class TrainConfig:
    method: str = "infonce"  # a name registered in pipeline.methods
    method_args: dict = field(default_factory=dict)  # checked against the method's own Args dataclass
    phases: list[PhaseConfig] = field(default_factory=list)  # empty: the method's default (one phase of `epochs`)
    guide: Optional[FeaturesConfig] = None  # a second extractor over the same shards, for methods that read it
    epochs: int = 10
    batch_size: int = 512  # global batch, split over the workers
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # per phase, after the warmup: cosine (to 0) | step (x lr_gamma at each milestone)
    lr_milestones: list[int] = field(default_factory=list)  # step schedule: epochs of the phase where LR drops
    lr_gamma: float = 0.1
    grad_clip: float = 1.0
    num_workers: int = 2
    use_gpu: bool = False
    prefetch_batches: int = 2  # batches each worker reads and collates ahead, in a thread
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    storage_path: Optional[str] = None  # checkpoints: a shared path or s3://...; default <workdir>/ray_results
    system_metrics_seconds: float = 10.0  # rank 0 samples CPU, memory and GPU into MLflow at this interval
    seed: int = 0


@dataclass
class RerankConfig:
    i2t: int = 50  # image queries: captions rescored by the method's `rerank` (0: off)
    t2i: int = 100  # caption queries: images rescored


@dataclass
class EvalConfig:
    split: str = "test"
    protocol: str = "generic"  # generic | coco-1k (5-fold) | coco-5k | f30k-1k
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    map_k: int = 100  # mAP@k / P@k for labelled sets; 0 = off
    chunk_size: int = 1024
    zero_shot: list[FeaturesConfig] = field(default_factory=list)  # extractors for `itr eval --zero-shot`
    rerank_k: RerankConfig = field(default_factory=RerankConfig)  # two-stage eval, for methods with `rerank`
    full_rerank: bool = False  # also rescore every pair with `rerank` (a full-local row; N x M rescorings)


@dataclass
class CompareConfig:
    """`itr compare`: every method of `methods` trained (or reused from the cache) on the same features and
    evaluated, with the zero-shot models of `eval.zero_shot`, on one protocol (pipeline/compare.py)."""

    methods: list[str] = field(default_factory=lambda: ["infonce", "vse", "user", "tgdt", "coder", "scl"])
    method_args: dict = field(default_factory=dict)  # method name -> its train.method_args (default: its defaults)
    train: dict = field(default_factory=dict)  # method name -> train overrides for it, e.g. {vse: {epochs: 4}}
    zero_shot: bool = True  # a row per model of eval.zero_shot (default: the `features` extractor itself)
    test_styles: list[str] = field(default_factory=list)  # synthetic only: every row also tested on these styles
    test_data: list[DataConfig] = field(default_factory=list)  # every row also tested on these datasets' eval.split


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI or sqlite:///<workdir>/mlflow.db
    experiment: str = "itr"


@dataclass
class RayConfig:
    address: Optional[str] = None  # default: $RAY_ADDRESS, else a local Ray sized to the machine
    num_cpus: Optional[int] = None  # local Ray only


@dataclass
class Config:
    workdir: str = "work"
    data: DataConfig = field(default_factory=DataConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @property
    def data_root(self) -> Path | str:
        """Returns the dataset folder: `data.root` (a local path, or a URI such as `s3://bucket/coco`), or
        `<workdir>/data/<name>` when unset."""
        from pipeline.storage import as_location

        return as_location(self.data.root) if self.data.root else self.workdir_path / "data" / self.data.name

    @property
    def shard_dir(self) -> Path | str:
        """Returns the dataset's shard folder: `<shard.output or <workdir>/shards>/<data.name>`."""
        from pipeline.storage import as_location, join

        return join(as_location(self.shard.output or self.workdir_path / "shards"), self.data.name)

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.workdir_path}/mlflow.db"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Returns `value` checked against (and, for numbers from strings, converted to) type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # a bug in this module, not in the YAML


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    """Returns dataclass `cls` built from `data`, every key and type checked (ConfigError naming `prefix.key`)."""
    return _build(cls, data, prefix)


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Returns (dotted key, YAML-parsed value) from a `key.sub=value` override."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Returns the validated `Config` from a YAML file (or defaults) plus `key.sub=value` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for item in overrides:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raises ConfigError for values that type-check but cannot work."""
    positive = {
        "shard.shard_size": cfg.shard.shard_size,
        "features.batch_size": cfg.features.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.num_workers": cfg.train.num_workers,
        "eval.chunk_size": cfg.eval.chunk_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    for key in ("cpus_per_actor", "min_actors", "max_actors"):
        if getattr(cfg.features, key) < 0:
            raise ConfigError(f"features.{key}: must be >= 0, got {getattr(cfg.features, key)}")
    if 0 < cfg.features.max_actors < cfg.features.min_actors:
        raise ConfigError(f"features.min_actors ({cfg.features.min_actors}) exceeds features.max_actors "
                          f"({cfg.features.max_actors})")
    if cfg.features.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"features.precision: expected auto|fp32|bf16|fp16, got {cfg.features.precision!r}")
    if cfg.train.batch_size % cfg.train.num_workers:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} is not divisible by train.num_workers={cfg.train.num_workers}"
        )
    if cfg.train.lr_schedule not in ("cosine", "step"):
        raise ConfigError(f"train.lr_schedule: expected cosine or step, got {cfg.train.lr_schedule!r}")
    for i, phase in enumerate(cfg.train.phases):
        if phase.epochs <= 0 or not phase.train:
            raise ConfigError(f"train.phases[{i}] ({phase.name}): needs epochs > 0 and a non-empty `train` list")
    if cfg.eval.protocol not in PROTOCOL_SIZES:
        raise ConfigError(f"eval.protocol: expected one of {', '.join(PROTOCOL_SIZES)}, got {cfg.eval.protocol!r}")
    if cfg.eval.map_k < 0:
        raise ConfigError(f"eval.map_k: must be >= 0, got {cfg.eval.map_k}")
    if not cfg.eval.ks or min(cfg.eval.ks) < 1:
        raise ConfigError(f"eval.ks: expected positive integers, got {cfg.eval.ks}")
    for key, style in [("data.synth.caption_style", cfg.data.synth.caption_style)] + [
            (f"compare.test_styles[{i}]", s) for i, s in enumerate(cfg.compare.test_styles)]:
        if style not in CAPTION_STYLES:
            raise ConfigError(f"{key}: expected one of {', '.join(CAPTION_STYLES)}, got {style!r}")


def to_dict(cfg: Any) -> dict:
    """Returns the config as a plain nested dict."""
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Returns {'a.b.c': value} for a nested dict (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
