"""Shared base of the baselines on precomputed features: two MLP heads over frozen, per-dimension standardised
global features (the extractor's embedding and its mean-pooled tokens), concatenated per side."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.base import Column, Method

STATS_CHUNK_ROWS = 8192  # rows read at a time when computing the standardisation statistics


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Returns Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


@dataclass
class HeadArgs:
    embed_dim: int = 256
    hidden_dim: int = 1024
    gather_with_grad: bool = False  # negatives from every worker's batch, gradients kept


def streamed_mean_std(chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the per-dimension mean and (unbiased) std of the rows of an iterable of (n, D) arrays, in float64
    sums, so a split is never held at once."""
    total, sq, n = 0.0, 0.0, 0
    for x in chunks:
        x = np.asarray(x, dtype=np.float64)
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    mean = total / n
    var = np.maximum(sq - n * mean * mean, 0.0) / max(1, n - 1)
    return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(var)).float()


class FeatureHeads(Method):
    image_inputs = ("image_embed", "image_pooled")
    text_inputs = ("text_embed", "text_pooled")

    @classmethod
    def columns(cls, args) -> list[Column]:
        return ([Column(c, "images") for c in cls.image_inputs] + [Column(c, "captions") for c in cls.text_inputs])

    def __init__(self, args: HeadArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        self.embed_dim = args.embed_dim
        image_dim = sum(dims.get(c, 0) for c in self.image_inputs)
        text_dim = sum(dims.get(c, 0) for c in self.text_inputs)
        for name, dim in (("image", image_dim), ("text", text_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.image_head = mlp(image_dim, args.hidden_dim, args.embed_dim)
        self.text_head = mlp(text_dim, args.hidden_dim, args.embed_dim)

    def prepare(self, inputs) -> None:
        """Sets the per-dimension mean/std of the train split's inputs. Random-init and frozen features share a
        large common component; without this the heads collapse."""
        for name, count, read, keys in (("image", inputs.num_images, inputs.images, self.image_inputs),
                                        ("text", inputs.num_captions, inputs.captions, self.text_inputs)):
            chunks = (self._concat(read(np.arange(s, min(s + STATS_CHUNK_ROWS, count))), keys).numpy()
                      for s in range(0, count, STATS_CHUNK_ROWS))
            mean, std = streamed_mean_std(chunks)
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_std").copy_(std.clamp_min(1e-6))

    @staticmethod
    def _concat(batch: dict, keys) -> torch.Tensor:
        return torch.cat([torch.as_tensor(batch[k]).float().flatten(1) for k in keys], 1)

    def encode_image(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) image embeddings of the batch's image columns."""
        x = (self._concat(batch, self.image_inputs) - self.image_mean) / self.image_std
        return F.normalize(self.image_head(x), dim=-1)

    def encode_text(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) caption embeddings of the batch's caption columns."""
        x = (self._concat(batch, self.text_inputs) - self.text_mean) / self.text_std
        return F.normalize(self.text_head(x), dim=-1)
