"""InfoNCE baseline on precomputed features (CLIP-style symmetric contrastive loss, Radford et al. 2021)
whose negatives are the batch (gathered from every worker with gradients when `gather_with_grad`) plus
the momentum queues (keys from an EMA copy of the heads, MoCo-style), with ALBEF's momentum distillation
as an option (`distill_alpha` > 0: soft targets from the EMA copy)."""
from __future__ import annotations

import torch

from pipeline.methods import register_method
from pipeline.methods.heads import FeatureHeads
from pipeline.train.losses import queue_infonce
from pipeline.train.momentum import MomentumState


@register_method("infonce")
class InfoNCEHead(FeatureHeads):
    def __init__(self, image_dim: int, text_dim: int, embed_dim: int = 256, hidden_dim: int = 1024,
                 temperature: float = 0.05, gather_with_grad: bool = False, distill_alpha: float = 0.0):
        super().__init__(image_dim, text_dim, embed_dim, hidden_dim)
        self.temperature = temperature
        self.gather_with_grad = gather_with_grad
        self.distill_alpha = distill_alpha

    def loss(self, out: dict, batch: dict, state: MomentumState | None) -> dict[str, torch.Tensor]:
        """Returns {"loss", "loss_i2t", "loss_t2i"}; batch["ids"] (B,) are image ids (captions of one image
        are positives of each other's image); batch["momentum"], when distilling, the EMA copy's outputs."""
        queues = {}
        if state is not None and state.image_queue is not None:
            queues = {"img_queue": state.image_queue.valid(), "txt_queue": state.text_queue.valid()}
        momentum = (batch["momentum"]["image"], batch["momentum"]["text"]) if "momentum" in batch else None
        return queue_infonce(out["image"], out["text"], batch["ids"], self.temperature,
                             gather_with_grad=self.gather_with_grad, momentum=momentum,
                             distill_alpha=self.distill_alpha, **queues)
