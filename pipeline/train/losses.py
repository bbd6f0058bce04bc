"""Contrastive and triplet losses with multi-positive targets (captions of the same image are positives),
optionally against the batch of every worker gathered with gradients (open_clip's `local_loss` +
`gather_with_grad`: each rank scores its own queries against all keys; DDP averages the gradients)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.train.distributed import all_gather_no_grad, all_gather_with_grad


def _keys(x: torch.Tensor, ids: torch.Tensor, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (all_gather_with_grad(x), all_gather_no_grad(ids)) if gather else (x, ids)


def multi_positive_nce(queries: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor,
                       key_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Returns the mean over queries of -log(sum_{k positive} p_k), p = softmax(q . k / T) over all keys.

    queries (B, D), keys (K, D), both L2-normalised; a key is positive for a query when their ids match
    (every query must have at least one positive among the keys)."""
    logits = queries @ keys.T / temperature
    positive = query_ids[:, None] == key_ids[None, :]
    log_prob = F.log_softmax(logits, dim=1)
    return -(torch.logsumexp(log_prob.masked_fill(~positive, float("-inf")), dim=1)).mean()


def queue_infonce(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, temperature: float,
                  img_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
                  txt_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
                  gather_with_grad: bool = False) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_i2t", "loss_t2i"}: symmetric InfoNCE of the batch (B, D) embeddings against the
    batch embeddings of the other modality (every worker's, with `gather_with_grad`) plus, when given, that
    modality's momentum queue (features, ids)."""
    txt_keys, txt_ids = _keys(txt, ids, gather_with_grad)
    img_keys, img_ids = _keys(img, ids, gather_with_grad)
    if txt_queue is not None and len(txt_queue[0]):
        txt_keys, txt_ids = torch.cat([txt_keys, txt_queue[0]]), torch.cat([txt_ids, txt_queue[1]])
    if img_queue is not None and len(img_queue[0]):
        img_keys, img_ids = torch.cat([img_keys, img_queue[0]]), torch.cat([img_ids, img_queue[1]])
    i2t = multi_positive_nce(img, txt_keys, ids, txt_ids, temperature)
    t2i = multi_positive_nce(txt, img_keys, ids, img_ids, temperature)
    return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t, "loss_t2i": t2i}


def hardest_negative_triplet(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, margin: float,
                             gather_with_grad: bool = False) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_i2t", "loss_t2i"}: the VSE++ max-violation hinge loss (Faghri et al. 2018),
    per query max_{negative k} [margin + s(q, k) - s(q, its pair)]_+, averaged over the batch (VSE++ sums;
    the mean keeps the scale independent of the batch size). img, txt (B, D) are pairs (row i of each);
    keys with the query's id are positives, never negatives."""
    pair = (img * txt).sum(1, keepdim=True)
    parts = {}
    for name, (queries, keys, key_ids) in {"loss_i2t": (img, *_keys(txt, ids, gather_with_grad)),
                                           "loss_t2i": (txt, *_keys(img, ids, gather_with_grad))}.items():
        negative = ids[:, None] != key_ids[None, :]
        cost = (margin + queries @ keys.T - pair).clamp(min=0).masked_fill(~negative, 0.0)
        parts[name] = cost.max(1).values.mean()
    return {"loss": parts["loss_i2t"] + parts["loss_t2i"], **parts}
