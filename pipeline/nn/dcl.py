"""CODER's diversity-sensitive contrastive loss (DCL; Wang et al., ECCV 2022, arXiv 2208.09843; METHODS.md 3.2).

For a query q with positive key k+ and negatives k_1..k_N (the other modality's in-batch items and momentum queue,
less every item of the query's own image), with cosine scores s_j = q . k_j and temperature T:

    L(q) = -log [ exp(s+/T) / ( exp(s+/T) + sum_j w_j exp(s_j/T) ) ]
    w_j  = N * softmax_j(beta * s_j + gamma * d_j)                  (no gradient through w)
    d_j  = 1 - k_j . m,  m = L2norm(mean of the query's negatives)  (how far k_j lies from the other negatives)

beta ("hardness") up-weights the negatives closest to the query (Robinson et al. 2021); gamma ("diversity")
up-weights those far from the bulk of the negatives. The weights sum to N, so at beta = gamma = 0 every w_j = 1
and L is InfoNCE over the positive and the negatives. The abstract states only "adaptive weighting of negative
pairs"; the form of w is a reconstruction (METHODS.md 3.2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.nn.distributed import all_gather_no_grad, all_gather_with_grad, world


def negative_weights(scores: torch.Tensor, negative: torch.Tensor, hardness: float = 1.0, diversity: float = 0.0,
                     keys: torch.Tensor | None = None) -> torch.Tensor:
    """Returns w (Q, K): N_q * softmax over the negatives of (hardness * scores + diversity * d) for the
    entries where `negative` (Q, K) is True, 0 elsewhere (N_q = the query's number of negatives); detached.
    `keys` (K, D), unit rows, are needed when diversity != 0."""
    with torch.no_grad():
        logits = hardness * scores
        if diversity:
            mask = negative.to(keys.dtype)
            centre = F.normalize(mask @ keys, dim=-1)  # (Q, D): the direction of each query's negatives
            logits = logits + diversity * (1.0 - centre @ keys.T)
        logits = logits.masked_fill(~negative, float("-inf"))
        count = negative.sum(1, keepdim=True)
        safe = logits.masked_fill(~negative.any(1, keepdim=True), 0.0)  # a query without negatives: no NaN
        return (torch.softmax(safe, dim=1) * count).masked_fill(~negative, 0.0)


def dcl(queries: torch.Tensor, keys: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
        temperature: float = 0.05, hardness: float = 1.0, diversity: float = 0.0) -> torch.Tensor:
    """Returns the mean over queries of L(q) (module docstring): queries (Q, D) and keys (K, D) unit rows,
    `positive` (Q,) the index of each query's positive key, `negative` (Q, K) bool the keys that are its
    negatives (never the positive). A query without negatives contributes 0."""
    scores = queries @ keys.T
    weights = negative_weights(scores.detach(), negative, hardness, diversity, keys.detach())
    logits = scores / temperature
    pos = logits.gather(1, positive[:, None])  # (Q, 1)
    neg = (logits + weights.clamp_min(1e-30).log()).masked_fill(~negative, float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], 1), dim=1) - pos[:, 0]).mean()


def dcl_loss(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, temperature: float = 0.05,
             hardness: float = 1.0, diversity: float = 0.0,
             img_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
             txt_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
             gather_with_grad: bool = False) -> dict[str, torch.Tensor]:
    """Returns {"loss": (i2t + t2i) / 2, "loss_i2t", "loss_t2i"}: DCL of (B, D) image and text embeddings of B pairs
    (image ids (B,)) in both directions. Keys of an image query: the batch's texts (every worker's, gradients kept,
    with `gather_with_grad`) then the text queue (features, ids); its positive is its own pair; its negatives are
    the keys of another image (other captions of its image and queue entries of its image are left out)."""
    rank = world()[0] if gather_with_grad else 0
    gather = all_gather_with_grad if gather_with_grad else (lambda x: x)
    key_ids = all_gather_no_grad(ids) if gather_with_grad else ids
    positive = torch.arange(len(ids), device=ids.device) + rank * len(ids)
    parts = {}
    for name, queries, others, queue in (("loss_i2t", img, txt, txt_queue), ("loss_t2i", txt, img, img_queue)):
        keys, kid = gather(others), key_ids
        if queue is not None and len(queue[0]):
            keys = torch.cat([keys, queue[0].detach().to(keys.dtype)])
            kid = torch.cat([kid, queue[1].to(kid.device)])
        parts[name] = dcl(queries, keys, positive, ids[:, None] != kid[None, :], temperature, hardness, diversity)
    return {"loss": (parts["loss_i2t"] + parts["loss_t2i"]) / 2, **parts}
