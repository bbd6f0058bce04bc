"""USER's Unified Training Objective (UTO; Zhang et al., arXiv 2301.06844; METHODS.md 1.5): an in-batch term and a
momentum-queue term, both with a smooth hinge on negatives at an absolute threshold gamma and a log gain on the
positive.

With cosine scores s, mu = 90 and gamma = 0.5:

    hinge(s_1..s_K) = (1/mu) log(1 + sum_k exp(mu (s_k - gamma)))       (a smooth max of (s_k - gamma)_+)
    gain(s)         = log(1 + max(0, s))

In-batch term, S = V T^T over the batch (v_i, t_i the i-th pair):

    L_b = (1/B) sum_i [ hinge(S_ji : j negative for caption i) + hinge(S_ij : j negative for image i) - gain(S_ii) ]

Queue term, with k^t_i / k^v_i the momentum keys of the pair and Q_t / Q_v the text and image queues:

    L_q = (1/B) sum_i [ hinge(v_i . Q_t[k] : k negative for i) - gain(v_i . k^t_i) ]
        + (1/B) sum_i [ hinge(t_i . Q_v[k] : k negative for i) - gain(t_i . k^v_i) ]

Total: L = lambda L_b + L_q (lambda 1 COCO, 20 Flickr30K). "Negative" means: an item of another image (its id
differs from the query's). The reference code zeroes only the diagonal of S, so other captions of the query's image
in the batch, and every queue entry of the query's image, count as negatives there; here they do not. Keys and
queues carry no gradient.
"""
from __future__ import annotations

import torch

from pipeline.nn.distributed import all_gather_no_grad, all_gather_with_grad


def smooth_hinge(scores: torch.Tensor, negative: torch.Tensor, mu: float, gamma: float) -> torch.Tensor:
    """Returns (Q,) (1/mu) log(1 + sum_k exp(mu (scores[q, k] - gamma))) over the k where `negative` (Q, K) is True
    (0 for a query without negatives), computed as a logsumexp with a zero term."""
    logits = (mu * (scores - gamma)).masked_fill(~negative, float("-inf"))
    zero = torch.zeros(len(scores), 1, dtype=logits.dtype, device=logits.device)
    return torch.logsumexp(torch.cat([zero, logits], 1), dim=1) / mu


def positive_gain(scores: torch.Tensor) -> torch.Tensor:
    """Returns log(1 + max(0, s)) elementwise (its gradient is 1 / (1 + s) for s > 0, else 0)."""
    return torch.log1p(scores.clamp_min(0.0))


def uto_batch(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, mu: float = 90.0, gamma: float = 0.5,
              gather_with_grad: bool = False) -> torch.Tensor:
    """Returns the in-batch term L_b (a scalar) of (B, D) image and text embeddings of B pairs with image ids (B,).
    With `gather_with_grad`, each query's negatives are the other modality's items of every worker's batch (the
    gradient reaches them; DDP's average then equals the single-process loss of the global batch)."""
    img_keys, txt_keys = (all_gather_with_grad(img), all_gather_with_grad(txt)) if gather_with_grad else (img, txt)
    key_ids = all_gather_no_grad(ids) if gather_with_grad else ids
    negative = ids[:, None] != key_ids[None, :]  # (B, world*B)
    i2t = smooth_hinge(img @ txt_keys.T, negative, mu, gamma)  # image i against the captions j
    t2i = smooth_hinge(txt @ img_keys.T, negative, mu, gamma)  # caption i against the images j
    return (i2t + t2i - positive_gain((img * txt).sum(1))).mean()


def uto_queue_side(queries: torch.Tensor, ids: torch.Tensor, positive_keys: torch.Tensor,
                   queue: tuple[torch.Tensor, torch.Tensor] | None, mu: float = 90.0,
                   gamma: float = 0.5) -> torch.Tensor:
    """Returns one side of L_q (a scalar): (1/B) sum_i [hinge(q_i . Q[k], k of another image) - gain(q_i . k_i)];
    queries (B, D), ids (B,), positive_keys (B, D) the momentum keys of the pairs, queue (features (K, D), ids
    (K,)) or None / empty (then only the gain term)."""
    gain = positive_gain((queries * positive_keys.detach()).sum(1))
    if queue is None or not len(queue[0]):
        return -gain.mean()
    features, queue_ids = queue
    negative = ids[:, None] != queue_ids[None, :].to(ids.device)
    return (smooth_hinge(queries @ features.detach().T.to(queries.dtype), negative, mu, gamma) - gain).mean()


def uto_loss(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor, batch_weight: float = 1.0,
             mu: float = 90.0, gamma: float = 0.5, keys: tuple[torch.Tensor, torch.Tensor] | None = None,
             img_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
             txt_queue: tuple[torch.Tensor, torch.Tensor] | None = None,
             gather_with_grad: bool = False) -> dict[str, torch.Tensor]:
    """Returns {"loss": lambda L_b + L_q, "loss_batch": L_b, "loss_queue": L_q} of (B, D) embeddings img, txt of
    B pairs with image ids (B,); `keys` = the momentum (image, text) keys of the pairs (None: no queue term),
    `img_queue` / `txt_queue` = (features, ids) of the filled queue slots."""
    batch = uto_batch(img, txt, ids, mu, gamma, gather_with_grad)
    parts = {"loss_batch": batch}
    loss = batch_weight * batch
    if keys is not None:
        img_keys, txt_keys = keys
        queue = (uto_queue_side(img, ids, txt_keys, txt_queue, mu, gamma)
                 + uto_queue_side(txt, ids, img_keys, img_queue, mu, gamma))
        parts["loss_queue"] = queue
        loss = loss + queue
    return {"loss": loss, **parts}
