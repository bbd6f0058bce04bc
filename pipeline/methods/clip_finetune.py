"""`clip_finetune`: an open_clip model fine-tuned end to end from the shards (images and captions, not stored
features) with the InfoNCE objective and momentum queues of `infonce`. Its training feed is Ray Data over the
tars (`pipeline.train.end_to_end`); the model is `features.model` with `features.pretrained`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import register_method
from pipeline.methods.infonce import ContrastArgs, MomentumContrast


@dataclass
class ClipFineTuneArgs(ContrastArgs):
    pass


@register_method("clip_finetune")
class ClipFineTune(MomentumContrast):
    """An open_clip model as a retrieval method: `forward(batch)` -> L2-normalised {"image", "text"} (B, D) from
    batch["pixels"] (B, 3, H, W) and batch["tokens"] (B, L). The model's own logit scale (and bias) become buffers
    (same state-dict keys): unused by the fixed-temperature loss, as parameters they would stall DDP's gradient
    reduction, and a phase that trains "*" would make them trainable again."""

    Args = ClipFineTuneArgs
    source = "shards"

    def __init__(self, args: ClipFineTuneArgs, dims: dict[str, int], clip: nn.Module | None = None):
        super().__init__(args, dims)
        if clip is None:
            raise ValueError("clip_finetune is built from an open_clip model: use pipeline.train.end_to_end.load_clip")
        self.clip = clip
        self.embed_dim = dims["embed_dim"]
        for name in ("logit_scale", "logit_bias"):
            value = getattr(clip, name, None)
            if isinstance(value, nn.Parameter):
                delattr(clip, name)
                clip.register_buffer(name, value.detach().clone())

    def encode_image(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) embeddings of batch["pixels"] (B, 3, H, W)."""
        return F.normalize(self.clip.encode_image(batch["pixels"]), dim=-1)

    def encode_text(self, batch: dict) -> torch.Tensor:
        """Returns L2-normalised (B, embed_dim) embeddings of batch["tokens"] (B, L). A causal text tower runs on the
        batch trimmed to its longest caption (`openclip.text_forward`): the same embeddings and gradients as the full
        context, without the padding's cost."""
        from pipeline.features.extractors import openclip

        tokens = batch["tokens"]
        tower = openclip.text_tower(self.clip)
        if tower is None:
            return F.normalize(self.clip.encode_text(tokens), dim=-1)
        return F.normalize(openclip.text_forward(tower, tokens[:, :openclip.trimmed_length(tokens)])[1], dim=-1)

    @classmethod
    def from_checkpoint(cls, spec: dict, state_dict: dict) -> "ClipFineTune":
        """Returns the trained model of a train-stage `method.json` spec (with its "model") and its model.pt (a plain
        open_clip state dict)."""
        method, _, _ = load_clip(spec["model"], None, torch.device("cpu"), 0, cls.Args(**spec["args"]))
        method.clip.load_state_dict(state_dict)
        return method


def load_clip(model_name: str, pretrained: str | None, device: torch.device, seed: int = 0,
              args: ClipFineTuneArgs | None = None) -> tuple[ClipFineTune, Callable, Callable]:
    """Returns (the open_clip model `model_name` (built-in or in `MODEL_CONFIG_DIR`) with weights `pretrained`
    (a cached tag, a local checkpoint path, or None: random init seeded by `seed`) as a `ClipFineTune` in
    train mode on `device`, its eval image transform (PIL -> (3, H, W)), its tokenizer (list[str] -> (B, L)))."""
    import open_clip

    from pipeline.config import FeaturesConfig
    from pipeline.features.extractors import openclip

    ext = openclip.load(FeaturesConfig(model=model_name, pretrained=pretrained, seed=seed), device)
    embed_dim = open_clip.get_model_config(model_name)["embed_dim"]
    method = ClipFineTune(args or ClipFineTuneArgs(), {"embed_dim": embed_dim}, clip=ext.model.train())
    method.preprocess, method.tokenizer = ext.preprocess, ext.tokenizer
    return method, ext.preprocess, ext.tokenizer
