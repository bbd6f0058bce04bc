"""The method contract: a retrieval method is a training task (open_clip's `TrainingTask`) that owns what it reads,
what it computes and what it keeps.

A method is an `nn.Module` registered by name (`pipeline.methods.register_method`) with:
- `Args`: a dataclass of its own arguments (`train.method_args`, checked before Ray starts; only these enter
  the train fingerprint);
- `columns(args)`: the feature-store columns it reads (`Column`), fixed (B, D), ragged (padded (B, N, D) + mask,
  capped by an argument such as `max_regions`) or caption text, from the main store or from the `guide` store
  (a second extractor over the same shards, joined by sample key);
- `new_state()`: its momentum state (EMA copies of any of its modules, any number of named queues);
- `param_groups(phase)` and `default_phases()`: what each training phase trains and at which learning rate;
- `prepare(inputs)` (once, on the driver: input statistics) and `on_epoch_start(epoch, inputs, state)` (every
  worker, every epoch: clustering, concept graphs); anything they compute lives in buffers or
  `get_extra_state`, so it is in every checkpoint;
- the step: `before_step` (e.g. ALBEF's EMA update and momentum outputs), `forward(batch)` (what DDP wraps),
  `loss(out, batch, state)` -> {"loss", parts}, `momentum_keys(batch, out, state)` -> what to enqueue;
- eval: `encode_image(batch)` / `encode_text(batch)` -> L2-normalised (B, D), and optionally
  `rerank(inputs, direction, query_rows, candidates)` -> fine-grained scores of a global top-k.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.config import PhaseConfig
from pipeline.nn.momentum import WHOLE, MomentumState


@dataclass(frozen=True)
class Column:
    """One input of a method. `name`: the store column; `table`: "images" or "captions"; `key`: the batch key
    (default `name`); `kind`: "fixed" -> batch[key] (B, D...), "ragged" -> batch[key] (B, N, D) zero-padded
    with batch[mask] (B, N) bool (True = a real item), N = the batch's largest count capped by the method
    argument named `cap`, "text" -> batch[key] = list of caption strings (the store's `caption` column);
    `store`: "main" or "guide" (the second store, its image rows joined to the main one's by sample key).
    Feature tensors keep the store's dtype (float16; boxes float32): a method converts them on its device."""

    name: str
    table: str = "images"
    key: str | None = None
    kind: str = "fixed"
    mask: str | None = None
    cap: str | None = None
    store: str = "main"

    @property
    def batch_key(self) -> str:
        return self.key or self.name


# Region columns of the stores: ragged (a variable number per image, masked) or a fixed grid, and their boxes.
REGION_COLUMNS = {"region_feats": "fixed", "patch_tokens": "fixed", "roi_feats": "ragged"}
REGION_BOXES = {"roi_feats": "roi_boxes", "patch_tokens": "patch_boxes", "region_feats": None}


def region_columns(column: str, boxes: bool = False) -> list[Column]:
    """The columns of a region store column (batch keys `regions`, `region_mask` when ragged, capped by the method
    argument `max_regions`) and, with `boxes`, of its boxes (`boxes`) when the store has them."""
    ragged = REGION_COLUMNS[column] == "ragged"
    kind, mask, cap = ("ragged", "region_mask", "max_regions") if ragged else ("fixed", None, None)
    cols = [Column(column, "images", key="regions", kind=kind, mask=mask, cap=cap)]
    if boxes and REGION_BOXES[column]:
        cols.append(Column(REGION_BOXES[column], "images", key="boxes", kind=kind, cap=cap))
    return cols


def text_columns(text_encoder: str | None) -> list[Column]:
    """The caption text (`captions`) for a trainable text encoder, else the stored per-token text features
    (`tokens`, `token_mask`, capped by the method argument `max_tokens`)."""
    if text_encoder:
        return [Column("caption", "captions", key="captions", kind="text")]
    return [Column("text_tokens", "captions", key="tokens", kind="ragged", mask="token_mask", cap="max_tokens")]


Phase = PhaseConfig  # name, epochs, lr (None: train.lr), train: the method's child modules it trains ("*": all)


class Method(nn.Module):
    """Base of every method. Subclasses set `Args` and implement `encode_image`, `encode_text` and `loss`."""

    Args: ClassVar[type] = None  # a dataclass
    version: ClassVar[int] = 1  # part of the train fingerprint: bump when the method's results would change
    source: ClassVar[str] = "features"  # features: store columns | shards: images and captions from the tars

    def __init__(self, args: Any, dims: dict[str, int]):
        super().__init__()
        self.args = args
        self.dims = dict(dims)

    # ------------------------------------------------------------ inputs
    @classmethod
    def columns(cls, args: Any) -> list[Column]:
        """Returns the store columns the method reads."""
        raise NotImplementedError

    @classmethod
    def requires(cls, args: Any) -> dict[str, tuple[str, dict, dict]]:
        """Returns the trainings this method builds on, each run (or reused from the cache) as a train stage of its
        own, with its own fingerprint and MLflow run: {part: (method name, its method_args, train config
        overrides such as {"epochs": 3})}. Changing only this method's own arguments retrains only it. Their
        trained methods reach `attach`. Default: none."""
        return {}

    def attach(self, parts: dict[str, "Method"]) -> None:
        """Called on the driver, before `prepare`, with the trained methods of `requires` (eval mode, CPU): copy
        what you build on into your own modules (their weights reach the workers in this method's state dict)."""

    def prepare(self, inputs) -> None:
        """Called once on the driver before training, with the train split's inputs (`pipeline.train.inputs`)."""

    # ------------------------------------------------------------ state, phases
    def new_state(self) -> MomentumState:
        """Returns the method's momentum state, on the method's device (default: none)."""
        return MomentumState(self)

    def default_phases(self, epochs: int, lr: float) -> list[Phase]:
        """Returns the phases used when `train.phases` is empty (default: one phase training everything)."""
        return [Phase("train", epochs, lr, [WHOLE])]

    def param_groups(self, phase: Phase) -> list[dict]:
        """Returns the optimizer's parameter groups of `phase` (only parameters that phase trains). Default: one
        group at `phase.lr`."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": phase.lr, "name": phase.name}]

    def on_epoch_start(self, epoch: int, inputs, state: MomentumState) -> None:
        """Called on every worker at the start of every epoch with the train split's inputs. Whatever it computes
        must be the same on every rank (a deterministic function of the data, the epoch and the state)."""

    # ------------------------------------------------------------ step
    def before_step(self, batch: dict, state: MomentumState) -> dict:
        """Returns the batch the forward sees (default: unchanged)."""
        return batch

    def loss(self, out: dict, batch: dict, state: MomentumState) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def momentum_keys(self, batch: dict, out: dict, state: MomentumState) -> tuple[dict, Any] | None:
        """Called after the optimizer step; returns (keys by queue name, ids: one (B,) tensor or one per queue)
        to enqueue, or None. Default: updates the EMA copies, then keys of queues "image" and "text" from the
        whole-method EMA copy."""
        if not state.queues:
            return None
        state.update(self)
        keys = state.ema[WHOLE](batch)
        return {name: keys[name] for name in state.queues}, batch["ids"]

    # ------------------------------------------------------------ eval
    def encode_image(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"image": self.encode_image(batch), "text": self.encode_text(batch)}

    def score(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Returns (N, M) similarities of global embeddings."""
        return img @ txt.T

    @classmethod
    def from_checkpoint(cls, spec: dict, state_dict: dict) -> "Method":
        """Returns the trained method of a train-stage `method.json` spec ({"name", "args", "dims"}) and state."""
        method = cls(parse_args(cls, spec["args"]), spec["dims"])
        method.load_state_dict(state_dict)
        return method

    rerank = None  # optional: rerank(inputs, direction "i2t"|"t2i", query_rows (c,), candidates (c, k)) -> (c, k)


def parse_args(cls: type[Method], values: dict | None, where: str = "train.method_args") -> Any:
    """Returns `cls.Args` built from `values`; raises ValueError naming an unknown key (with the known ones) or a
    value of the wrong type."""
    from pipeline.config import ConfigError, build_dataclass

    try:
        return build_dataclass(cls.Args, dict(values or {}), where)
    except ConfigError as err:
        raise ValueError(str(err)) from err


def args_dict(args: Any) -> dict:
    """Returns the method arguments as a plain dict (for the fingerprint, method.json and MLflow)."""
    return dataclasses.asdict(args)
