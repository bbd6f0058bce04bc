"""Shared base of the methods that train on precomputed features: two MLP heads over frozen,
per-dimension standardised features (global embedding + mean-pooled tokens). Subclasses add `loss`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Returns Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


class FeatureHeads(nn.Module):
    image_inputs = ("image_embed", "image_pooled")
    text_inputs = ("text_embed", "text_pooled")

    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, hidden_dim: int = 1024):
        super().__init__()
        for name, dim in (("image", image_dim), ("text", text_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.ones(dim))
        self.image_head = mlp(image_dim, hidden_dim, embed_dim)
        self.text_head = mlp(text_dim, hidden_dim, embed_dim)

    @torch.no_grad()
    def set_standardization(self, image: torch.Tensor, text: torch.Tensor) -> None:
        """Sets per-dimension mean/std from training inputs (N, Di) and (M, Dt). Random-init and frozen
        features share a large common component; without this the heads collapse."""
        for name, x in (("image", image), ("text", text)):
            x = x.float()
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(1e-6))

    def encode_image(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) image embeddings from batch["image"] (B, image_dim)."""
        x = (batch["image"].float() - self.image_mean) / self.image_std
        return F.normalize(self.image_head(x), dim=-1)

    def encode_text(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) caption embeddings from batch["text"] (B, text_dim)."""
        x = (batch["text"].float() - self.text_mean) / self.text_std
        return F.normalize(self.text_head(x), dim=-1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"image": self.encode_image(batch), "text": self.encode_text(batch)}

    def score(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Returns (N, M) cosine similarities of normalised embeddings."""
        return img @ txt.T
