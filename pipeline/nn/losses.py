"""Contrastive and triplet losses with multi-positive targets (captions of the same image are positives),
optionally against the batch of every worker gathered with gradients (open_clip's `local_loss` +
`gather_with_grad`: each rank scores its own queries against all keys; DDP averages the gradients)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.nn.distributed import all_gather_no_grad, all_gather_with_grad


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


def distilled_nce(queries: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor, key_ids: torch.Tensor,
                  momentum_queries: torch.Tensor, momentum_keys: torch.Tensor, temperature: float,
                  alpha: float) -> torch.Tensor:
    """Returns ALBEF's momentum-distilled contrastive loss (Li et al. 2021, eq. 2-3): the mean over queries of
    the cross-entropy H(y, softmax(q . k / T)) with soft targets y = alpha * softmax(q_m . k_m / T) + (1 - alpha)
    * (uniform over the query's positives), q_m, k_m the momentum encoder's embeddings of the same queries and
    keys (no gradient flows through them). Shapes as `multi_positive_nce`, momentum_* like queries/keys."""
    positive = (query_ids[:, None] == key_ids[None, :]).float()
    with torch.no_grad():
        targets = alpha * F.softmax(momentum_queries @ momentum_keys.T / temperature, dim=1)
        targets += (1 - alpha) * positive / positive.sum(1, keepdim=True)
    return -(F.log_softmax(queries @ keys.T / temperature, dim=1) * targets).sum(1).mean()


def queue_infonce(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, temperature: float,
                  img_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
                  txt_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
                  gather_with_grad: bool = False, momentum: tuple[torch.Tensor, torch.Tensor] | None = None,
                  distill_alpha: float = 0.0) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_i2t", "loss_t2i"}: symmetric InfoNCE of the batch (B, D) embeddings against the
    batch embeddings of the other modality (every worker's, with `gather_with_grad`) plus, when given, that
    modality's momentum queue (features, ids). With `distill_alpha` > 0 and `momentum` = the momentum
    encoder's (image, text) embeddings of the batch, targets are ALBEF's soft ones (`distilled_nce`)."""
    txt_keys, txt_ids = _keys(txt, ids, gather_with_grad)
    img_keys, img_ids = _keys(img, ids, gather_with_grad)
    distill = momentum is not None and distill_alpha > 0
    if distill:
        img_m, txt_m = momentum
        img_keys_m = all_gather_no_grad(img_m) if gather_with_grad else img_m
        txt_keys_m = all_gather_no_grad(txt_m) if gather_with_grad else txt_m
    if txt_queue is not None and len(txt_queue[0]):
        txt_keys, txt_ids = torch.cat([txt_keys, txt_queue[0]]), torch.cat([txt_ids, txt_queue[1]])
        txt_keys_m = torch.cat([txt_keys_m, txt_queue[0]]) if distill else None
    if img_queue is not None and len(img_queue[0]):
        img_keys, img_ids = torch.cat([img_keys, img_queue[0]]), torch.cat([img_ids, img_queue[1]])
        img_keys_m = torch.cat([img_keys_m, img_queue[0]]) if distill else None
    if distill:
        i2t = distilled_nce(img, txt_keys, ids, txt_ids, img_m, txt_keys_m, temperature, distill_alpha)
        t2i = distilled_nce(txt, img_keys, ids, img_ids, txt_m, img_keys_m, temperature, distill_alpha)
    else:
        i2t = multi_positive_nce(img, txt_keys, ids, txt_ids, temperature)
        t2i = multi_positive_nce(txt, img_keys, ids, img_ids, temperature)
    return {"loss": (i2t + t2i) / 2, "loss_i2t": i2t, "loss_t2i": t2i}


def hardest_negative_triplet(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, margin: float,
                             gather_with_grad: bool = False, hardest: bool = True) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_i2t", "loss_t2i"}: the VSE++ max-violation hinge loss (Faghri et al. 2018),
    per query max_{negative k} [margin + s(q, k) - s(q, its pair)]_+, averaged over the batch (VSE++ sums;
    the mean keeps the scale independent of the batch size). img, txt (B, D) are pairs (row i of each);
    keys with the query's id are positives, never negatives. `hardest=False`: the sum over the negatives instead
    of the max (VSE0, the warm-up of VSE-infinity)."""
    pair = (img * txt).sum(1)
    parts = {}
    for name, (queries, keys, key_ids) in {"loss_i2t": (img, *_keys(txt, ids, gather_with_grad)),
                                           "loss_t2i": (txt, *_keys(img, ids, gather_with_grad))}.items():
        parts[name] = violation(queries @ keys.T, pair, ids[:, None] != key_ids[None, :], margin, hardest).mean()
    return {"loss": parts["loss_i2t"] + parts["loss_t2i"], **parts}


def violation(scores: torch.Tensor, pair: torch.Tensor, negative: torch.Tensor, margin: float,
              hardest: bool = True) -> torch.Tensor:
    """Returns (Q,) max_{k negative} [margin + scores[q, k] - pair[q]]_+ of (Q, K) scores, (Q,) scores of each query's
    own pair and the (Q, K) bool `negative` mask (0 for a query without a negative); `hardest=False`: the sum over
    the negatives k instead of the max."""
    hinge = (margin + scores - pair[:, None]).clamp(min=0).masked_fill(~negative, 0.0)
    return hinge.max(1).values if hardest else hinge.sum(1)


def hardest_negative_hinge(scores: torch.Tensor, ids: torch.Tensor, margin: float,
                           hardest: bool = True) -> dict[str, torch.Tensor]:
    """Returns {"loss", "loss_i2t", "loss_t2i"}: `hardest_negative_triplet` on any (B, B) score matrix, S[i, j] =
    s(image of row i, caption j), pairs on the diagonal (e.g. a local token-matching score):
    i2t = mean_i max_{j: ids_j != ids_i} [m + S_ij - S_ii]_+, t2i = mean_j max_{i: ids_i != ids_j} [m + S_ij - S_jj]_+,
    loss = i2t + t2i (`hardest=False`: sums over j, i instead of the max)."""
    negative = ids[:, None] != ids[None, :]
    pair = scores.diagonal()
    i2t = violation(scores, pair, negative, margin, hardest).mean()
    t2i = violation(scores.T, pair, negative, margin, hardest).mean()
    return {"loss": i2t + t2i, "loss_i2t": i2t, "loss_t2i": t2i}


def intra_modal_consistency(img: torch.Tensor, txt: torch.Tensor, margin: float) -> torch.Tensor:
    """Returns TGDT's intra-modal consistency hinge (Liu et al. 2023, CMC loss) of (B, D) L2-normalised image and
    caption embeddings (row i of each a pair): with A = img img^T and C = txt txt^T, the mean over j of
    [max_i |C_ij - A_ij| - margin]_+ (the reference sums over j; the mean keeps the scale independent of B)."""
    return ((txt @ txt.T - img @ img.T).abs().amax(0) - margin).clamp(min=0).mean()
