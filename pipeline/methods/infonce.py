"""InfoNCE baseline on precomputed features (CLIP-style symmetric contrastive loss, Radford et al. 2021) whose
negatives are the batch (gathered from every worker with gradients when `gather_with_grad`) plus momentum
queues of keys from an EMA copy of the method (MoCo-style), with ALBEF's momentum distillation as an option
(`distill_alpha` > 0: soft targets from the EMA copy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.methods import register_method
from pipeline.methods.base import Method
from pipeline.methods.heads import FeatureHeads, HeadArgs
from pipeline.nn.losses import queue_infonce
from pipeline.nn.momentum import WHOLE, MomentumState


@dataclass
class ContrastArgs:
    temperature: float = 0.05
    distill_alpha: float = 0.0  # ALBEF momentum distillation weight (0 = off; ALBEF uses 0.4)
    queue_size: int = 4096  # per modality; 0 disables the queues (a multiple of the global batch)
    momentum: float = 0.995  # EMA of the key encoder
    gather_with_grad: bool = False


class MomentumContrast(Method):
    """The InfoNCE objective with EMA keys in an "image" and a "text" queue: a mixin for any method whose
    forward returns {"image", "text"} embeddings (the feature heads, an end-to-end open_clip model)."""

    def new_state(self) -> MomentumState:
        a = self.args
        return MomentumState(self, ema=(WHOLE,) if a.queue_size or a.distill_alpha > 0 else (),
                             queues={"image": self.embed_dim, "text": self.embed_dim}, queue_size=a.queue_size,
                             momentum=a.momentum)

    def before_step(self, batch: dict, state: MomentumState) -> dict:
        """With distillation (ALBEF's order): EMA update first, then the EMA copy's outputs in batch["momentum"]."""
        if self.args.distill_alpha <= 0:
            return batch
        state.update(self)
        with torch.no_grad():
            return {**batch, "momentum": {k: v.float() for k, v in state.ema[WHOLE](batch).items()}}

    @torch.no_grad()
    def momentum_keys(self, batch: dict, out: dict, state: MomentumState):
        if not state.queues:
            return None
        if "momentum" in batch:  # distilling: the EMA copy already ran before the step
            return {k: batch["momentum"][k] for k in state.queues}, batch["ids"]
        return super().momentum_keys(batch, out, state)

    def loss(self, out: dict, batch: dict, state: MomentumState) -> dict[str, torch.Tensor]:
        """Returns {"loss", "loss_i2t", "loss_t2i"}; batch["ids"] (B,) are image ids (captions of one image are
        positives of each other's image)."""
        momentum = (batch["momentum"]["image"], batch["momentum"]["text"]) if "momentum" in batch else None
        queues = (state.queue("image"), state.queue("text")) if state is not None else (None, None)
        return queue_infonce(out["image"], out["text"], batch["ids"], self.args.temperature,
                             img_queue=queues[0], txt_queue=queues[1],
                             gather_with_grad=self.args.gather_with_grad, momentum=momentum,
                             distill_alpha=self.args.distill_alpha)


@dataclass
class InfoNCEArgs(ContrastArgs, HeadArgs):
    pass


@register_method("infonce")
class InfoNCEHead(MomentumContrast, FeatureHeads):
    Args = InfoNCEArgs
