"""Losses: the VSE++ hardest-negative hinge on a hand case, ALBEF momentum distillation against its formula,
and gather-with-grad on two gloo ranks giving the gradient of the full-batch loss."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pipeline.nn.losses import distilled_nce, hardest_negative_triplet, queue_infonce

BATCH, DIM = 6, 4


def test_hardest_negative_hand_case_and_same_id_is_never_a_negative():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.8, 0.6], [0.6, 0.8]])
    # pairs score .8; cross scores .6: violation .2 + .6 - .8 = 0 with margin .2, so margin .3 gives .1
    parts = hardest_negative_triplet(img, txt, torch.tensor([0, 1]), margin=0.3)
    assert parts["loss_i2t"].item() == pytest.approx(0.1) and parts["loss_t2i"].item() == pytest.approx(0.1)
    same_image = hardest_negative_triplet(img, txt, torch.tensor([0, 0]), margin=0.3)
    assert same_image["loss"].item() == 0.0


def test_distillation_reduces_to_cross_entropy_and_to_zero_gradient_at_its_own_targets():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_()
    k = F.normalize(torch.randn(6, 8, generator=g), dim=1)
    q_ids, k_ids = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3, 4, 5])
    hard = distilled_nce(q, k, q_ids, k_ids, q.detach(), k, 0.1, alpha=0.0)  # one positive each: plain CE
    assert hard.item() == pytest.approx(F.cross_entropy(q @ k.T / 0.1, q_ids).item(), rel=1e-6)
    # alpha = 1 with the momentum copy equal to the online model: the targets are the model's own softmax,
    # so the gradient vanishes (ALBEF's soft targets only pull towards the momentum model's view)
    soft = distilled_nce(q, k, q_ids, k_ids, q.detach(), k, 0.1, alpha=1.0)
    (grad,) = torch.autograd.grad(soft, q)
    assert grad.abs().max().item() < 1e-6
    # the formula itself, with a queue and a second positive: targets .4 * momentum softmax + .6 * uniform
    img, txt, ids = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.tensor([0, 1, 1])
    img_m, txt_m = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    queue = (torch.randn(4, 8, generator=g), torch.tensor([1, 5, 6, 7]))
    parts = queue_infonce(img, txt, ids, 0.2, img_queue=queue, txt_queue=queue, momentum=(img_m, txt_m),
                          distill_alpha=0.4)
    keys, keys_m, key_ids = torch.cat([txt, queue[0]]), torch.cat([txt_m, queue[0]]), torch.cat([ids, queue[1]])
    positive = (ids[:, None] == key_ids[None, :]).float()
    targets = 0.4 * F.softmax(img_m @ keys_m.T / 0.2, 1) + 0.6 * positive / positive.sum(1, keepdim=True)
    want = -(F.log_softmax(img @ keys.T / 0.2, 1) * targets).sum(1).mean()
    assert parts["loss_i2t"].item() == pytest.approx(want.item(), rel=1e-6)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])  # two captions of image 2 on different ranks
    return x, y, ids


def _loss(weight: torch.Tensor, x, y, ids, name: str, gather: bool) -> torch.Tensor:
    img = torch.nn.functional.normalize(x @ weight, dim=-1)
    txt = torch.nn.functional.normalize(y @ weight, dim=-1)
    if name == "infonce":
        return queue_infonce(img, txt, ids, 0.1, gather_with_grad=gather)["loss"]
    return hardest_negative_triplet(img, txt, ids, 0.2, gather_with_grad=gather)["loss"]


def _worker(rank: int, init_file: str, name: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x, y, ids = _inputs()
    weight = torch.eye(DIM).requires_grad_()
    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    _loss(weight, x[half], y[half], ids[half], name, gather=True).backward()
    dist.all_reduce(weight.grad)  # what DDP does: average the ranks' gradients
    torch.save(weight.grad / 2, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it (an abort at exit otherwise)
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["infonce", "vse"])
def test_gather_with_grad_on_two_ranks_gives_the_full_batch_gradient(tmp_path, name):
    x, y, ids = _inputs()
    weight = torch.eye(DIM).requires_grad_()
    # local loss + gather_with_grad: each rank scores its own queries against every key; both losses are
    # means over queries, so the mean of the two ranks' losses is the full-batch loss
    full = _loss(weight, x, y, ids, name, gather=False)
    full.backward()
    # results come back as files: no fork of this process (a Ray driver in the test session)
    mp.spawn(_worker, args=(str(tmp_path / "init"), name, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"rank{rank}.pt"), weight.grad, atol=1e-6), rank
