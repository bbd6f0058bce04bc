"""VSE++ baseline on precomputed features (Faghri et al., BMVC 2018): hinge triplet loss on the hardest
negative in the batch, in both directions, over the same MLP heads as `infonce`."""
from __future__ import annotations

import torch

from pipeline.methods import register_method
from pipeline.methods.heads import FeatureHeads
from pipeline.train.losses import hardest_negative_triplet
from pipeline.train.momentum import MomentumState


@register_method("vse")
class VSEHead(FeatureHeads):
    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, hidden_dim: int = 1024,
                 margin: float = 0.2, gather_with_grad: bool = False):
        super().__init__(image_dim, text_dim, embed_dim, hidden_dim)
        self.margin = margin
        self.gather_with_grad = gather_with_grad

    def loss(self, out: dict, batch: dict, state: MomentumState | None) -> dict[str, torch.Tensor]:
        """Returns {"loss", "loss_i2t", "loss_t2i"} of the VSE++ max-violation loss (momentum state unused)."""
        return hardest_negative_triplet(out["image"], out["text"], batch["ids"], self.margin,
                                        gather_with_grad=self.gather_with_grad)
