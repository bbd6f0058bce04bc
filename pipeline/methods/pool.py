"""`pool`: a small set-pooling method on region and token features, the smallest method that uses what the
engine streams: ragged regions with a mask (RoIAlign `roi_feats`, or the fixed `patch_tokens` / imported BUTD
`region_feats` grids), per-token text features with a mask, or a fine-tuned BERT-family encoder from a local folder
in its own parameter group. Each side projects its items, takes the masked mean and L2-normalises; the objective is
`infonce`'s (queues of EMA keys, optional ALBEF distillation)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import register_method
from pipeline.methods.base import REGION_COLUMNS, Column, Phase, region_columns, text_columns
from pipeline.methods.infonce import ContrastArgs, MomentumContrast


@dataclass
class PoolArgs(ContrastArgs):
    embed_dim: int = 256
    region_column: str = "roi_feats"  # roi_feats | patch_tokens | region_feats (imported BUTD)
    max_regions: int = 36
    max_tokens: int = 32
    text_encoder: Optional[str] = None  # a local BERT-family folder, fine-tuned on the captions (else text_tokens)
    text_lr_scale: float = 0.1  # the text encoder's learning rate, relative to the phase's
    augment: Optional[bool] = None  # USER's word augmentation of the captions; default: on with a text encoder

    def __post_init__(self):
        if self.region_column not in REGION_COLUMNS:
            raise ValueError(f"train.method_args (pool).region_column: expected one of {', '.join(REGION_COLUMNS)}, "
                             f"got {self.region_column!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Returns the (B, D) mean of (B, N, D) `x` over the positions where `mask` (B, N) is True (zeros for none)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@register_method("pool")
class Pool(MomentumContrast):
    Args = PoolArgs

    @classmethod
    def columns(cls, args: PoolArgs) -> list[Column]:
        return region_columns(args.region_column) + text_columns(args.text_encoder)

    def __init__(self, args: PoolArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        self.embed_dim = args.embed_dim
        self.image_proj = nn.Linear(dims.get("regions", 1), args.embed_dim)
        self.text_encoder = None
        if args.text_encoder:
            from pipeline.nn.text_encoder import load_text_encoder

            self.text_encoder = load_text_encoder(args.text_encoder, args.max_tokens)
            text_dim = self.text_encoder.hidden_size
        else:
            text_dim = dims.get("tokens", 1)
        self.text_proj = nn.Linear(text_dim, args.embed_dim)
        self.augment = bool(args.text_encoder) if args.augment is None else args.augment
        self._epoch = 0

    def param_groups(self, phase: Phase) -> list[dict]:
        """The text encoder at `text_lr_scale` x the phase's LR, the rest at the phase's LR (trainable ones only)."""
        encoder = {id(p) for p in self.text_encoder.parameters()} if self.text_encoder is not None else set()
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in encoder]
        text = [p for p in self.parameters() if p.requires_grad and id(p) in encoder]
        groups = [{"params": rest, "lr": phase.lr, "name": "heads"}] if rest else []
        if text:
            groups.append({"params": text, "lr": phase.lr * self.args.text_lr_scale, "name": "text_encoder"})
        return groups

    def on_epoch_start(self, epoch: int, inputs, state) -> None:
        self._epoch = epoch  # seeds the word augmentation

    def encode_image(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) embeddings of batch["regions"] (B, N, D) (mask "region_mask")."""
        regions = batch["regions"].float()
        mask = batch.get("region_mask")
        if mask is None:
            mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        return F.normalize(masked_mean(self.image_proj(regions), mask), dim=-1)

    def encode_text(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) embeddings of batch["tokens"] (B, L, D) with "token_mask", or of
        batch["captions"] through the text encoder (augmented in training when `augment`)."""
        if self.text_encoder is None:
            tokens, mask = batch["tokens"].float(), batch["token_mask"]
        else:
            generator = None
            augment = self.augment and self.training
            if augment:  # a function of the captions and the epoch: the same on resume
                seed = zlib.crc32("\n".join(batch["captions"]).encode()) + 1_000_003 * self._epoch
                generator = torch.Generator().manual_seed(seed)
            enc = self.text_encoder.tokenize(batch["captions"], augment=augment, generator=generator)
            device = self.text_proj.weight.device
            tokens, mask = self.text_encoder(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        return F.normalize(masked_mean(self.text_proj(tokens), mask), dim=-1)
