"""VSE++ baseline on precomputed features (Faghri et al., BMVC 2018): hinge triplet loss on the hardest negative
in the batch, in both directions, over the same MLP heads as `infonce` (no momentum state)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods import register_method
from pipeline.methods.heads import FeatureHeads, HeadArgs
from pipeline.nn.losses import hardest_negative_triplet
from pipeline.nn.momentum import MomentumState


@dataclass
class VSEArgs(HeadArgs):
    margin: float = 0.2


@register_method("vse")
class VSEHead(FeatureHeads):
    Args = VSEArgs

    def loss(self, out: dict, batch: dict, state: MomentumState) -> dict[str, torch.Tensor]:
        """Returns {"loss", "loss_i2t", "loss_t2i"} of the VSE++ max-violation loss."""
        return hardest_negative_triplet(out["image"], out["text"], batch["ids"], self.args.margin,
                                        gather_with_grad=self.args.gather_with_grad)
