"""Momentum queue and EMA: wrap-around, refusal of a non-dividing batch, and identical queues on two
gloo ranks equal to the queue of one worker fed the same global batches."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.nn.losses import multi_positive_nce, queue_infonce
from pipeline.nn.momentum import MomentumQueue, ema_update, enqueue_together, momentum_copy

STEPS, LOCAL_BATCH, DIM, SIZE = 5, 2, 3, 8


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(2 * LOCAL_BATCH, DIM, generator=g), torch.arange(2 * LOCAL_BATCH) + 100 * step


def test_single_worker_queue_wraps_and_reports_valid_slots():
    q = MomentumQueue(SIZE, DIM)
    assert len(q.valid()[0]) == 0
    for step in range(3):
        keys, ids = global_batch(step)
        q.enqueue(keys, ids)
    assert int(q.ptr) == (3 * 4) % SIZE
    assert q.ids.tolist() == [200, 201, 202, 203, 100, 101, 102, 103]
    assert torch.equal(q.features[:4], global_batch(2)[0])


def test_batch_that_does_not_divide_the_queue_is_refused():
    with pytest.raises(ValueError, match="queue size 8 is not a multiple of the global batch 3"):
        MomentumQueue(8, 2).enqueue(torch.zeros(3, 2), torch.zeros(3))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    q, packed_a, packed_b = MomentumQueue(SIZE, DIM), MomentumQueue(SIZE, DIM), MomentumQueue(SIZE, 2)
    for step in range(STEPS):
        keys, ids = global_batch(step)
        sl = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        q.enqueue(keys[sl], ids[sl])
        enqueue_together([packed_a, packed_b], [keys[sl], keys[sl, :2] * 2], ids[sl])
    torch.save((q.features.clone(), q.ids.clone(), int(q.ptr), q.checksum(), packed_a.checksum(),
                packed_b.features.clone()), f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_queues_equal_to_one_worker(tmp_path):
    # results come back as files: no fork of this process (a Ray driver in the test session)
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = MomentumQueue(SIZE, DIM)
    for step in range(STEPS):
        single.enqueue(*global_batch(step))
    for rank in (0, 1):
        feats, ids, ptr, checksum, packed_checksum, packed_b = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(feats, single.features) and torch.equal(ids, single.ids) and ptr == int(single.ptr)
        assert checksum == single.checksum() == packed_checksum  # one packed all-gather, same queue
        assert torch.equal(packed_b, single.features[:, :2] * 2)


def test_ema_update_moves_towards_the_online_model():
    online = torch.nn.Linear(2, 2)
    twin = momentum_copy(online)
    assert not any(p.requires_grad for p in twin.parameters())
    before = twin.weight.clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema_update(twin, online, 0.9)
    assert torch.allclose(twin.weight, 0.9 * before + 0.1 * online.weight)


def test_multi_positive_nce_reduces_to_cross_entropy_with_one_positive():
    q = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(4, 5), dim=-1)
    ids = torch.arange(4)
    want = torch.nn.functional.cross_entropy(q @ k.T / 0.1, ids)
    assert torch.allclose(multi_positive_nce(q, k, ids, ids, 0.1), want)


def test_queue_negatives_raise_the_loss_and_same_id_queue_entries_are_positives():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    ids = torch.arange(4)
    base = queue_infonce(img, img, ids, 0.1)["loss"]
    negatives = (torch.nn.functional.normalize(torch.randn(16, 8), dim=-1), torch.arange(16) + 10)
    assert queue_infonce(img, img, ids, 0.1, negatives, negatives)["loss"] > base
    copies = (img.clone(), ids.clone())  # the same keys again, same ids: positives, not negatives
    assert queue_infonce(img, img, ids, 0.1, copies, copies)["loss"] < queue_infonce(
        img, img, ids, 0.1, (img.clone(), ids + 50), (img.clone(), ids + 50))["loss"]
