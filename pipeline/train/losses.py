"""Contrastive losses with multi-positive targets (captions of the same image are positives)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
                  txt_queue: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_i2t", "loss_t2i"}: symmetric InfoNCE of the batch (B, D) embeddings against the
    in-batch embeddings of the other modality plus, when given, that modality's momentum queue (features, ids)."""
    txt_keys, txt_ids = txt, ids
    img_keys, img_ids = img, ids
    if txt_queue is not None and len(txt_queue[0]):
        txt_keys, txt_ids = torch.cat([txt, txt_queue[0]]), torch.cat([ids, txt_queue[1]])
    if img_queue is not None and len(img_queue[0]):
        img_keys, img_ids = torch.cat([img, img_queue[0]]), torch.cat([ids, img_queue[1]])
    i2t = multi_positive_nce(img, txt_keys, ids, txt_ids, temperature)
    t2i = multi_positive_nce(txt, img_keys, ids, img_ids, temperature)
    return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t, "loss_t2i": t2i}
