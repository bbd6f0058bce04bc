"""USER: Unified Semantic Enhancement with momentum contrast (Zhang et al., TIP 2024, arXiv 2301.06844;
METHODS.md section 1; docs/methods.md, `user`).

- Image side (`pipeline.nn.encoders.RegionEncoder`): the regions of a store column (imported BUTD `region_feats`,
  RoIAlign `roi_feats` with a mask, or grid `patch_tokens`), enhanced by the self guide (SGE), by a guide made
  from the CLIP global image embedding of a second feature store (CGE), or by both (`guide`); projection plus MLP
  residual; GPO; L2 normalisation.
- Text side (`pipeline.nn.encoders.TokenEncoder`): stored per-token features, or the last hidden states of a
  fine-tuned BERT-family encoder from a local folder (its own parameter group, `text_lr_scale` x the LR, word
  augmentation on by default), projected per token, GPO, L2 normalisation.
- Momentum: an EMA copy of the whole method (m = 0.999) gives the keys of every pair, after the EMA update and
  before the loss (the reference's order); they fill an image and a text queue (with image ids, empty at start).
- Loss: UTO (`pipeline.nn.uto`), lambda x the in-batch term plus the queue term, logged as `loss_batch` and
  `loss_queue`; an item of the query's own image is never a negative, in the batch or in a queue.

Dropout (SGE's 0.4, in the query and in the key encoders, as in the reference) draws its masks from a generator
seeded by the batch's image ids, the epoch and the encoder (query or key): the same on resume, different per rank.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pipeline.methods import register_method
from pipeline.methods.base import REGION_COLUMNS, Column, Method, Phase, region_columns, text_columns
from pipeline.nn.encoders import GUIDES, RegionEncoder, TokenEncoder
from pipeline.nn.momentum import WHOLE, MomentumState
from pipeline.nn.uto import uto_loss

QUERY, KEY = 0, 1  # dropout streams of the query encoders and of the momentum key encoders


@dataclass
class UserArgs:
    embed_dim: int = 1024
    region_column: str = "region_feats"  # region_feats (imported BUTD) | roi_feats (RoIAlign, ragged) | patch_tokens
    max_regions: int = 36  # cap of a ragged region column (rows beyond it are dropped)
    max_tokens: int = 32  # cap of the stored tokens, or of the text encoder's tokens
    guide: str = "both"  # self (SGE) | clip (CGE, reads train.guide's store) | both
    guide_column: str = "image_embed"  # the guide store's global image embedding
    attention_scale: float = 1.0  # lambda_att of the region attention softmax
    dropout: float = 0.4  # SGE's dropout on the local and global projections
    gpo_dim: int = 32  # GPO's positional code width and GRU hidden size
    text_encoder: Optional[str] = None  # a local BERT-family folder, fine-tuned (else stored text_tokens)
    text_lr_scale: float = 0.1  # the text encoder's LR relative to the phase's (USER: 5e-5 / 5e-4)
    augment: Optional[bool] = None  # USER's word augmentation of the captions; default: on with a text encoder
    mu: float = 90.0  # UTO's scale
    gamma: float = 0.5  # UTO's absolute threshold on negative scores
    batch_weight: float = 1.0  # lambda, the weight of the in-batch term (1 COCO, 20 Flickr30K)
    queue_size: int = 4096  # per modality (4096 COCO, 2048 Flickr30K); 0: no momentum encoders, no queue term
    momentum: float = 0.999  # EMA of the key encoders
    gather_with_grad: bool = True  # in-batch negatives from every worker's batch (the reference's single batch)

    def __post_init__(self):
        where = "train.method_args (user)"
        if self.guide not in GUIDES:
            raise ValueError(f"{where}.guide: expected one of {', '.join(GUIDES)}, got {self.guide!r}")
        if self.region_column not in REGION_COLUMNS:
            raise ValueError(f"{where}.region_column: expected one of {', '.join(REGION_COLUMNS)}, "
                             f"got {self.region_column!r}")
        for name in ("embed_dim", "max_regions", "max_tokens", "gpo_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}: expected a positive number, got {getattr(self, name)}")
        if self.gpo_dim % 2:
            raise ValueError(f"{where}.gpo_dim: expected an even number (sin/cos pairs), got {self.gpo_dim}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"{where}: dropout must lie in [0, 1) and momentum in [0, 1]")


def batch_seed(ids: torch.Tensor, epoch: int, stream: int) -> int:
    """Returns a 32-bit seed of a batch's image ids (B,), the epoch and the stream (QUERY or KEY)."""
    head = zlib.crc32(ids.detach().cpu().numpy().astype(np.int64).tobytes())
    return zlib.crc32(np.array([epoch, stream], dtype=np.int64).tobytes(), head)


@register_method("user")
class User(Method):
    Args = UserArgs

    @classmethod
    def columns(cls, args: UserArgs) -> list[Column]:
        """The region column (ragged with a mask, or a fixed grid), the guide store's image embedding unless
        `guide: self`, and the stored text tokens or the caption text."""
        guide = [Column(args.guide_column, "images", key="guide", store="guide")] if args.guide != "self" else []
        return region_columns(args.region_column) + guide + text_columns(args.text_encoder)

    def __init__(self, args: UserArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        self.embed_dim = args.embed_dim
        self.image_encoder = RegionEncoder(dims["regions"], args.embed_dim, args.guide, dims.get("guide", 0),
                                           args.dropout, args.attention_scale, args.gpo_dim)
        self.text_encoder = None
        if args.text_encoder:
            from pipeline.nn.text_encoder import load_text_encoder

            self.text_encoder = load_text_encoder(args.text_encoder, args.max_tokens)
            text_dim = self.text_encoder.hidden_size
        else:
            text_dim = dims["tokens"]
        self.text_head = TokenEncoder(text_dim, args.embed_dim, args.gpo_dim)
        self.augment = bool(args.text_encoder) if args.augment is None else args.augment
        self._epoch = 0  # seeds dropout and augmentation; set every epoch (on the key encoders too)
        self._stream = QUERY  # KEY on the momentum copy: its dropout draws other masks

    # ------------------------------------------------------------ phases, hooks
    def param_groups(self, phase: Phase) -> list[dict]:
        """The text encoder at `text_lr_scale` x the phase's LR, the rest at the phase's LR (trainable ones only)."""
        encoder = {id(p) for p in self.text_encoder.parameters()} if self.text_encoder is not None else set()
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder]
        text = [p for p in self.parameters() if p.requires_grad and id(p) in encoder]
        groups = [{"params": rest, "lr": phase.lr, "name": phase.name}] if rest else []
        if text:
            groups.append({"params": text, "lr": phase.lr * self.args.text_lr_scale, "name": "text_encoder"})
        return groups

    def on_epoch_start(self, epoch: int, inputs, state: MomentumState) -> None:
        self._epoch = epoch
        for twin in state.ema.values():
            twin._epoch = epoch

    def new_state(self) -> MomentumState:
        """An EMA copy of the whole method and two queues ("image", "text") of `queue_size` keys, when on."""
        a = self.args
        state = MomentumState(self, ema=(WHOLE,) if a.queue_size else (), queue_size=a.queue_size,
                              queues={"image": a.embed_dim, "text": a.embed_dim}, momentum=a.momentum)
        for twin in state.ema.values():
            twin._stream = KEY
        return state

    # ------------------------------------------------------------ encoders
    def _generator(self, batch: dict, device: torch.device) -> torch.Generator | None:
        """The dropout generator of a training batch (None in eval, or without image ids: torch's global RNG)."""
        if not self.training or self.args.dropout <= 0 or "ids" not in batch:
            return None
        return torch.Generator(device=device).manual_seed(batch_seed(batch["ids"], self._epoch, self._stream))

    def encode_image(self, batch: dict) -> torch.Tensor:
        """Returns (B, embed_dim) unit vectors of batch["regions"] (B, N, D) (mask "region_mask" for a ragged
        column) and, with a CLIP guide, batch["guide"] (B, C)."""
        regions = batch["regions"]
        return self.image_encoder(regions, batch.get("region_mask"), batch.get("guide"),
                                  self._generator(batch, regions.device))

    def text_features(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (token features (B, L, H), mask (B, L) bool): the stored tokens, or the text encoder's last
        hidden states of the captions (word augmentation in training when `augment`, seeded by the captions and
        the epoch: the query and key encoders see the same augmented caption, and so does a resumed run)."""
        if self.text_encoder is None:
            return batch["tokens"], batch["token_mask"]
        augment = self.augment and self.training
        generator = None
        if augment:
            seed = zlib.crc32("\n".join(batch["captions"]).encode()) + 1_000_003 * self._epoch
            generator = torch.Generator().manual_seed(seed)
        enc = self.text_encoder.tokenize(batch["captions"], augment=augment, generator=generator)
        return self.text_encoder(enc["input_ids"], enc["attention_mask"])

    def encode_text(self, batch: dict) -> torch.Tensor:
        """Returns (B, embed_dim) unit vectors of the batch's captions."""
        return self.text_head(*self.text_features(batch))

    # ------------------------------------------------------------ step
    def before_step(self, batch: dict, state: MomentumState) -> dict:
        """The reference's order: the EMA update, then the key encoders' outputs of the batch in batch["momentum"]
        (the positives of the queue term, enqueued after the step)."""
        if not state.ema:
            return batch
        state.update(self)
        with torch.no_grad():
            keys = state.ema[WHOLE](batch)
        return {**batch, "momentum": {k: v.float() for k, v in keys.items()}}

    @torch.no_grad()
    def momentum_keys(self, batch: dict, out: dict, state: MomentumState):
        if not state.queues or "momentum" not in batch:
            return None
        return {name: batch["momentum"][name] for name in state.queues}, batch["ids"]

    def loss(self, out: dict, batch: dict, state: MomentumState | None) -> dict[str, torch.Tensor]:
        """Returns {"loss": lambda L_b + L_q, "loss_batch": L_b, "loss_queue": L_q (with momentum keys)}."""
        a = self.args
        keys = (batch["momentum"]["image"], batch["momentum"]["text"]) if "momentum" in batch else None
        queues = (state.queue("image"), state.queue("text")) if state is not None else (None, None)
        return uto_loss(out["image"], out["text"], batch["ids"], a.batch_weight, a.mu, a.gamma, keys=keys,
                        img_queue=queues[0], txt_queue=queues[1], gather_with_grad=a.gather_with_grad)
