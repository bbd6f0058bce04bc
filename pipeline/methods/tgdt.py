"""`tgdt`: the Token-Guided Dual Transformer with the consistent multimodal contrastive (CMC) loss and two-stage
inference (Liu et al., "Efficient Token-guided Image-text Retrieval with Consistent Multimodal Contrastive
Training", IEEE TIP 2023, arXiv 2306.08789; reference code LCFractal/TGDT, which builds on TERAN).

Branches (METHODS.md 2.1), E = `embed_dim`:
- image: slot 0 is a zero feature with a zero box (after the box MLP, a learned constant: the image [CLS]), then
  the regions; [v; x1, y1, x2, y2; area] -> Linear -> ReLU -> Linear (the box/area encoding) -> region
  transformer -> Linear to E -> T_img^a;
- text: per-token features (`text_tokens`, e.g. open_clip's, SOT .. EOT) or a fine-tuned BERT-family encoder
  truncated to `text_layers` layers ([CLS] .. [SEP]) -> Linear to E -> T_txt^a;
- top: stop-gradient -> T^b (`top_layers` layers per branch). Global embedding = L2norm(T^b token 0); local
  tokens = the L2-normalised tokens after slot 0 (text: without the last real token, [SEP] / EOT).
Every transformer gets the padding mask, the top ones too (the reference leaves T^b unmasked, so a caption's
embedding depends on its batch).

Loss (METHODS.md 2.2), each term a logged part:
- `loss_global`: the VSE++ hardest-negative hinge on the global cosines (margin 0.2);
- `loss_intra`: the intra-modal consistency hinge mean_j [max_i |C_ij - A_ij| - 0.3]_+ (A image-image, C
  text-text cosines of the batch);
- `loss_local`: the same hinge as `loss_global` on S_loc = `local_scale` x sum over words of each word's best
  region cosine (T^b tokens);
- `loss_local_lower`: that hinge on the T^a tokens (TERAN's MrSw loss: what trains the lower stack).
Which terms apply follows what the running phase trains (read from `requires_grad`, so any `train.phases` works):
the lower stack (`image_lower`, `text_lower`) gets `loss_local_lower`, the top (`image_top`, `text_top`) gets the
CMC loss global + intra + local; `schedule: two_phase` (default) runs phase `local` then phase `cmc`,
`schedule: joint` one phase training both at once (the stop-gradient kept: the sum of both losses).

Two-stage inference (METHODS.md 2.3): the engine ranks by the global embeddings and calls `rerank` on each query's
top-k, rescored by S_final = S_loc + `rerank_global_weight` x S_glob on the `rerank_tokens` tokens (T^a by
default, the reference's test routing).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods import register_method
from pipeline.methods.base import REGION_BOXES, Column, Method, Phase, region_columns, text_columns
from pipeline.nn.losses import hardest_negative_hinge, hardest_negative_triplet, intra_modal_consistency
from pipeline.nn.matching import POOLS, grouped_local_scores, local_score_matrix

LOWER, TOP = ("image_lower", "text_lower"), ("image_top", "text_top")
RERANK_BLOCK_ELEMENTS = 1 << 24  # candidate token values gathered at once by `rerank` (64 MiB as float32)
ENCODE_BATCH = 256  # rows per batch when `rerank` encodes a split's tokens


@dataclass
class TGDTArgs:
    embed_dim: int = 1024  # E: projections, T^a, T^b
    region_column: str = "roi_feats"  # roi_feats (boxes roi_boxes) | patch_tokens (patch_boxes) | region_feats (no box)
    max_regions: int = 36  # cap of the padded region axis (ragged regions)
    max_tokens: int = 32  # cap of the padded token axis (stored tokens, or the text encoder's tokenizer)
    region_dim: Optional[int] = None  # width of the box MLP and region transformer; None: the region feature width
    region_layers: int = 4
    lower_layers: int = 2  # T^a per branch
    top_layers: int = 2  # T^b per branch
    heads: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.1
    text_encoder: Optional[str] = None  # a local BERT-family folder, fine-tuned (else the stored text_tokens)
    text_layers: Optional[int] = 6  # layers of the text encoder kept (None: all)
    text_lr_scale: float = 1.0  # the text encoder's LR relative to the phase's (the reference: 1)
    margin: float = 0.2  # global and local hinges
    intra_margin: float = 0.3
    global_weight: float = 1.0
    intra_weight: float = 1.0
    local_weight: float = 1.0
    local_scale: float = 10.0  # S_loc = local_scale x pooled word-region cosines (the reference: 10 x the sum)
    local_pool: str = "sum"  # sum | mean over the words
    schedule: str = "two_phase"  # default phases: two_phase (local, then cmc) | joint
    local_epochs: Optional[int] = None  # two_phase: epochs of phase `local` (None: half of train.epochs)
    rerank_tokens: str = "lower"  # local tokens of the second stage: lower (T^a, the reference) | top (T^b)
    rerank_global_weight: float = 1.0  # S_final = S_loc + w S_glob
    # the first epochs that train a part (the lower stack, the top layers) sum its hinges over all negatives instead
    # of taking the hardest (VSE-infinity's warm-up; from random weights the hardest negative alone learns nothing)
    mean_negative_epochs: int = 1

    def __post_init__(self):
        choices = {"region_column": tuple(REGION_BOXES), "local_pool": POOLS, "schedule": ("two_phase", "joint"),
                   "rerank_tokens": ("lower", "top")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.method_args (tgdt).{name}: expected one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.mean_negative_epochs < 0:
            raise ValueError(f"train.method_args (tgdt).mean_negative_epochs: must be >= 0, got "
                             f"{self.mean_negative_epochs}")
        for name in ("embed_dim", "region_dim"):
            check_heads(f"train.method_args (tgdt).{name}", getattr(self, name), self.heads)


def check_heads(what: str, width: int | None, heads: int) -> None:
    """Raises ValueError when a transformer width is not a multiple of the number of heads (None passes)."""
    if width is not None and width % heads:
        raise ValueError(f"{what}: {width} is not a multiple of heads ({heads})")


class NoLayers(nn.Module):
    """A transformer stack of 0 layers: returns its input."""

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


def transformer(width: int, layers: int, a: TGDTArgs) -> nn.Module:
    """Returns `layers` post-LN ReLU transformer encoder layers of width `width` (a.heads heads, a.ffn_dim FFN,
    a.dropout), batch first (0 layers: `NoLayers`); call with src_key_padding_mask = ~mask."""
    if layers == 0:
        return NoLayers()
    layer = nn.TransformerEncoderLayer(width, a.heads, a.ffn_dim, a.dropout, activation="relu", batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def box_inputs(boxes: torch.Tensor) -> torch.Tensor:
    """Returns (B, N, 5) [x1, y1, x2, y2, area] of (B, N, 4) normalised xyxy boxes."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)
    return torch.cat([boxes, area[..., None]], -1)


def with_cls(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (x with a zero row prepended (B, 1 + N, W), mask with a True slot prepended (B, 1 + N))."""
    return (torch.cat([x.new_zeros(x.shape[0], 1, x.shape[2]), x], 1),
            torch.cat([mask.new_ones(mask.shape[0], 1), mask], 1))


def word_mask(mask: torch.Tensor) -> torch.Tensor:
    """Returns the (B, L - 1) mask of the words among tokens 1..L-1 of a (B, L) token mask whose real tokens are
    [CLS]/SOT, words, [SEP]/EOT: the real tokens less the first and the last of each caption."""
    last = mask.long().sum(1) - 1
    words = mask.clone()
    words[torch.arange(len(mask), device=mask.device), last.clamp_min(0)] = False
    return words[:, 1:]


class RegionStack(nn.Module):
    """The lower image branch: [CLS] slot + regions with boxes -> box MLP -> region transformer -> Linear -> T^a."""

    def __init__(self, feat_dim: int, a: TGDTArgs):
        super().__init__()
        width = a.region_dim or feat_dim
        check_heads("tgdt: the region feature width (set train.method_args.region_dim)", width, a.heads)
        self.box_mlp = nn.Sequential(nn.Linear(feat_dim + 5, width), nn.ReLU(), nn.Linear(width, width))
        self.region_transformer = transformer(width, a.region_layers, a)
        self.proj = nn.Linear(width, a.embed_dim)
        self.transformer = transformer(a.embed_dim, a.lower_layers, a)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor | None, mask: torch.Tensor | None):
        """Returns (tokens (B, 1 + N, E), mask (B, 1 + N) bool) of regions (B, N, D), their normalised xyxy boxes
        (B, N, 4) or None (zero boxes) and mask (B, N) or None (all real); slot 0 is the [CLS]."""
        feats = feats.float()
        if boxes is None:
            boxes = feats.new_zeros(*feats.shape[:2], 4)
        if mask is None:
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        x, mask = with_cls(torch.cat([feats, box_inputs(boxes.float())], -1), mask)
        x = self.region_transformer(self.box_mlp(x), src_key_padding_mask=~mask)
        return self.transformer(self.proj(x), src_key_padding_mask=~mask), mask


class TextStack(nn.Module):
    """The lower text branch: stored per-token features or a fine-tuned BERT-family encoder -> Linear -> T^a."""

    def __init__(self, token_dim: int | None, a: TGDTArgs):
        super().__init__()
        self.encoder = None
        if a.text_encoder:
            from pipeline.nn.text_encoder import load_text_encoder

            self.encoder = load_text_encoder(a.text_encoder, a.max_tokens, a.text_layers)
            token_dim = self.encoder.hidden_size
        self.proj = nn.Linear(token_dim, a.embed_dim)
        self.transformer = transformer(a.embed_dim, a.lower_layers, a)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (tokens (B, L, E), mask (B, L) bool) of batch["tokens"] (B, L, W) with "token_mask", or of
        batch["captions"] through the encoder; token 0 is [CLS] / SOT."""
        if self.encoder is None:
            tokens, mask = batch["tokens"].float(), batch["token_mask"]
        else:
            enc = self.encoder.tokenize(batch["captions"])
            tokens, mask = self.encoder(enc["input_ids"], enc["attention_mask"])
            mask = mask.to(tokens.device)
        return self.transformer(self.proj(tokens.float()), src_key_padding_mask=~mask), mask


@register_method("tgdt")
class TGDT(Method):
    Args = TGDTArgs
    version = 2  # 2: the hinges' warm-up over all negatives

    @classmethod
    def columns(cls, args: TGDTArgs) -> list[Column]:
        return region_columns(args.region_column, boxes=True) + text_columns(args.text_encoder)

    def __init__(self, args: TGDTArgs, dims: dict[str, int]):
        super().__init__(args, dims)
        self.image_lower = RegionStack(dims.get("regions", 1), args)
        self.text_lower = TextStack(dims.get("tokens", 1), args)
        self.image_top = transformer(args.embed_dim, args.top_layers, args)
        self.text_top = transformer(args.embed_dim, args.top_layers, args)
        # epochs begun with each part trained (buffers: in every checkpoint, so a resumed run warms up alike)
        self.register_buffer("lower_epochs", torch.zeros((), dtype=torch.long))
        self.register_buffer("top_epochs", torch.zeros((), dtype=torch.long))
        self._rerank_cache = None

    # ------------------------------------------------------------ phases
    def default_phases(self, epochs: int, lr: float) -> list[Phase]:
        """two_phase: `local` (the lower stacks, `loss_local_lower`) for `local_epochs` (default epochs // 2), then
        `cmc` (the top layers, the CMC loss) for the rest; joint: one phase training everything."""
        if self.args.schedule == "joint":
            return [Phase("joint", epochs, lr, ["*"])]
        first = self.args.local_epochs if self.args.local_epochs is not None else epochs // 2
        if first < 1 or epochs - first < 1:
            raise ValueError(f"tgdt schedule two_phase: {epochs} epochs cannot be split into a local phase of "
                             f"{first} and a cmc phase (set train.epochs >= 2 and 1 <= local_epochs < epochs)")
        return [Phase("local", first, lr, list(LOWER)), Phase("cmc", epochs - first, lr, list(TOP))]

    def param_groups(self, phase: Phase) -> list[dict]:
        """The text encoder at `text_lr_scale` x the phase's LR, the rest at the phase's LR (trainable ones only)."""
        encoder = self.text_lower.encoder
        ids = {id(p) for p in encoder.parameters()} if encoder is not None else set()
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        text = [p for p in self.parameters() if p.requires_grad and id(p) in ids]
        groups = [{"params": rest, "lr": phase.lr, "name": phase.name}] if rest else []
        if text:
            groups.append({"params": text, "lr": phase.lr * self.args.text_lr_scale, "name": "text_encoder"})
        return groups

    def trained_parts(self) -> tuple[bool, bool]:
        """Returns (the lower stack is trained, the top layers are trained) in the running phase."""
        def trained(names):
            return any(p.requires_grad for n in names for p in getattr(self, n).parameters())
        return trained(LOWER), trained(TOP)

    def on_epoch_start(self, epoch: int, inputs, state) -> None:
        """Counts the epochs that train each part (`lower_epochs`, `top_epochs`: the hinges' warm-up)."""
        lower, top = self.trained_parts()
        self.lower_epochs += int(lower)
        self.top_epochs += int(top)

    def train(self, mode: bool = True):
        if mode:
            self._rerank_cache = None  # the weights are about to change
        return super().train(mode)

    # ------------------------------------------------------------ branches
    def image_tokens(self, batch: dict, top: bool = True) -> dict[str, torch.Tensor]:
        """Returns {"lower" (B, N, E) L2-normalised T^a region tokens, "mask" (B, N) bool} and with `top`, "global"
        (B, E) and "top" (B, N, E) from T^b, for the image columns of `batch`."""
        tokens, mask = self.image_lower(batch["regions"], batch.get("boxes"), batch.get("region_mask"))
        return self._split(tokens, mask, mask[:, 1:], self.image_top if top else None)

    def text_tokens(self, batch: dict, top: bool = True) -> dict[str, torch.Tensor]:
        """Returns `image_tokens`' dict for the caption columns of `batch`: word tokens only in "lower" / "top"
        ([CLS]/SOT and [SEP]/EOT excluded by "mask")."""
        tokens, mask = self.text_lower(batch)
        return self._split(tokens, mask, word_mask(mask), self.text_top if top else None)

    @staticmethod
    def _split(tokens: torch.Tensor, mask: torch.Tensor, local_mask: torch.Tensor, top: nn.Module | None) -> dict:
        out = {"lower": F.normalize(tokens[:, 1:], dim=-1), "mask": local_mask}
        if top is not None:
            upper = top(tokens.detach(), src_key_padding_mask=~mask)  # the stop-gradient of the reference
            out.update(glob=F.normalize(upper[:, 0], dim=-1), top=F.normalize(upper[:, 1:], dim=-1))
        return out

    def encode_image(self, batch: dict) -> torch.Tensor:
        return self.image_tokens(batch)["glob"]

    def encode_text(self, batch: dict) -> torch.Tensor:
        return self.text_tokens(batch)["glob"]

    # ------------------------------------------------------------ step
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Returns {"image_lower", "image_mask", "text_lower", "text_mask"} and, when the top is trained (or in
        eval), {"image", "text" (global), "image_top", "text_top"}; masks as float (the loop casts outputs)."""
        lower, top = self.trained_parts()
        top = top or not self.training
        img, txt = self.image_tokens(batch, top), self.text_tokens(batch, top)
        out = {"image_lower": img["lower"], "image_mask": img["mask"].float(), "text_lower": txt["lower"],
               "text_mask": txt["mask"].float()}
        if top:
            out.update(image=img["glob"], text=txt["glob"], image_top=img["top"], text_top=txt["top"])
        return out

    def local_scores(self, regions, region_mask, words, word_mask_) -> torch.Tensor:
        """Returns the (B, B) S_loc of every image row against every caption row of a batch (`local_scale` x the
        pooled best-region cosines)."""
        return self.args.local_scale * local_score_matrix(regions, region_mask, words, word_mask_,
                                                          self.args.local_pool)

    def loss(self, out: dict, batch: dict, state) -> dict[str, torch.Tensor]:
        """Returns {"loss", parts}: `loss_local_lower` when the lower stack is trained, and `loss_global`,
        `loss_intra`, `loss_local` (the CMC loss, on T^b) when the top is; loss = their weighted sum. A part's
        hinges sum over the negatives during the first `mean_negative_epochs` epochs that train it."""
        a, ids = self.args, batch["ids"]
        lower, top = self.trained_parts()
        img_mask, txt_mask = out["image_mask"] > 0.5, out["text_mask"] > 0.5
        parts: dict[str, torch.Tensor] = {}
        total = out["image_lower"].new_zeros(())
        if lower:
            s = self.local_scores(out["image_lower"], img_mask, out["text_lower"], txt_mask)
            hardest = int(self.lower_epochs) > a.mean_negative_epochs
            parts["loss_local_lower"] = hardest_negative_hinge(s, ids, a.margin, hardest=hardest)["loss"]
            total = total + a.local_weight * parts["loss_local_lower"]
        if top:
            hardest = int(self.top_epochs) > a.mean_negative_epochs
            parts["loss_global"] = hardest_negative_triplet(out["image"], out["text"], ids, a.margin,
                                                            hardest=hardest)["loss"]
            parts["loss_intra"] = intra_modal_consistency(out["image"], out["text"], a.intra_margin)
            s = self.local_scores(out["image_top"], img_mask, out["text_top"], txt_mask)
            parts["loss_local"] = hardest_negative_hinge(s, ids, a.margin, hardest=hardest)["loss"]
            total = total + (a.global_weight * parts["loss_global"] + a.intra_weight * parts["loss_intra"]
                             + a.local_weight * parts["loss_local"])
        return {"loss": total, **parts}

    # ------------------------------------------------------------ two-stage eval
    @torch.no_grad()
    def split_tokens(self, inputs) -> dict[str, dict[str, torch.Tensor]]:
        """Returns {"images", "captions"}: each {"glob" (n, E) float32, "tokens" (n, T, E) float16 L2-normalised
        local tokens (`rerank_tokens`), "mask" (n, T) bool} of every row of `inputs`, encoded once per `inputs`
        (eval mode) and kept until the method trains again. Memory: (N R + M L) E x 2 bytes."""
        cache = self._rerank_cache
        if cache is not None and cache["inputs"]() is inputs:
            return cache["tokens"]
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        key = self.args.rerank_tokens
        result = {}
        for table, count, encode in (("images", inputs.num_images, self.image_tokens),
                                     ("captions", inputs.num_captions, self.text_tokens)):
            glob, toks, masks = [], [], []
            for start in range(0, count, ENCODE_BATCH):
                rows = np.arange(start, min(start + ENCODE_BATCH, count))
                batch = getattr(inputs, table)(rows)
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                out = encode(batch)
                glob.append(out["glob"].float().cpu())
                toks.append(out[key].half().cpu())
                masks.append(out["mask"].cpu())
            width = max(t.shape[1] for t in toks)
            tokens = torch.cat([F.pad(t, (0, 0, 0, width - t.shape[1])) for t in toks])
            mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in masks])
            used = max(1, int(mask.sum(1).max())) if len(mask) else 1  # trim the padding no row uses
            result[table] = {"glob": torch.cat(glob), "tokens": tokens[:, :used].contiguous(),
                             "mask": mask[:, :used].contiguous()}
        self.train(was_training)
        self._rerank_cache = {"inputs": weakref.ref(inputs), "tokens": result}
        return result

    @torch.no_grad()
    def rerank(self, inputs, direction: str, query_rows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Returns (c, k) S_final = S_loc + `rerank_global_weight` x S_glob of each query row (c,) (images for
        "i2t", captions for "t2i") against its candidate rows (c, k) of the other table, from `split_tokens`;
        candidate tokens are gathered in blocks of at most RERANK_BLOCK_ELEMENTS values (no loop over pairs)."""
        cache = self.split_tokens(inputs)
        image_side = direction == "i2t"
        queries, gallery = (cache["images"], cache["captions"]) if image_side else (cache["captions"], cache["images"])
        query_rows, candidates = torch.as_tensor(query_rows).cpu(), torch.as_tensor(candidates).cpu()
        c, k = candidates.shape
        tokens, width = gallery["tokens"].shape[1:]
        per_pair = max(1, tokens * width)
        pairs = max(1, RERANK_BLOCK_ELEMENTS // per_pair)
        rows_per_block, cols_per_block = (max(1, pairs // k), k) if k <= pairs else (1, pairs)
        scores = torch.empty(c, k)
        for r0 in range(0, c, rows_per_block):
            q = query_rows[r0:r0 + rows_per_block]
            q_tok, q_mask = queries["tokens"][q].float()[:, None], queries["mask"][q][:, None]  # (g, 1, T, E)
            q_glob = queries["glob"][q]
            for c0 in range(0, k, cols_per_block):
                cand = candidates[r0:r0 + rows_per_block, c0:c0 + cols_per_block]
                g_tok, g_mask = gallery["tokens"][cand].float(), gallery["mask"][cand]  # (g, kb, T', E)
                if image_side:
                    local = grouped_local_scores(q_tok, q_mask, g_tok, g_mask, self.args.local_pool)[:, 0]
                else:
                    local = grouped_local_scores(g_tok, g_mask, q_tok, q_mask, self.args.local_pool)[:, :, 0]
                glob = torch.einsum("ge,gke->gk", q_glob, gallery["glob"][cand])
                scores[r0:r0 + rows_per_block, c0:c0 + cols_per_block] = (
                    self.args.local_scale * local + self.args.rerank_global_weight * glob)
        return scores
