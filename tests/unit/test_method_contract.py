"""The method contract without Ray: ragged collation with masks and caps, the guide store joined by key, phases
freezing exactly what they name, four named queues identical on two gloo ranks, a method's own state in its
state dict, and two-stage eval counting a positive outside the candidates as a miss."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config import EvalConfig, PhaseConfig
from pipeline.methods.base import Column, Method
from pipeline.nn.momentum import MomentumState
from pipeline.stages.eval import two_stage_eval
from pipeline.train.inputs import pad_ragged, prefetch
from pipeline.train.loop import apply_phase, phase_at, phases_of
from tests.method_fixtures import ArraySplit, feature_inputs


@dataclass
class PoolArgs:
    max_regions: int = 2
    max_tokens: int = 8


class Pool(Method):
    """A toy method on ragged regions and tokens plus a guide column, with its own state (prototypes)."""

    Args = PoolArgs

    @classmethod
    def columns(cls, args):
        return [Column("roi_feats", "images", key="regions", kind="ragged", mask="region_mask", cap="max_regions"),
                Column("roi_boxes", "images", key="boxes", kind="ragged", cap="max_regions"),
                Column("image_embed", "images", key="guide", store="guide"),
                Column("text_tokens", "captions", key="tokens", kind="ragged", mask="token_mask", cap="max_tokens"),
                Column("caption", "captions", key="captions", kind="text")]

    def __init__(self, args, dims):
        super().__init__(args, dims)
        self.image_proj, self.text_proj = nn.Linear(3, 4), nn.Linear(2, 4)
        self.register_buffer("prototypes", torch.zeros(5, 4))


def split_with_regions() -> tuple[ArraySplit, ArraySplit]:
    regions = [np.arange(9, dtype=np.float32).reshape(3, 3), np.zeros((0, 3), np.float32), np.ones((1, 3))]
    boxes = [np.tile([[0, 0, 1, 1]], (len(r), 1)).astype(np.float32) for r in regions]
    tokens = [np.full((n, 2), j, np.float32) for j, n in enumerate([1, 3, 2, 2])]
    main = ArraySplit({"roi_feats": regions, "roi_boxes": boxes}, {"text_tokens": tokens}, [0, 0, 1, 2],
                      keys=["a", "b", "c"], texts=["one", "two", "three", "four"])
    guide = ArraySplit({"image_embed": np.array([[30.0], [10.0], [20.0]])}, {}, [0, 1, 2], keys=["b", "c", "a"])
    return main, guide


def test_pad_ragged_hand_case():
    values = np.concatenate([np.ones((3, 2)), np.zeros((0, 2)), 2 * np.ones((1, 2))]).astype(np.float16)
    padded, mask = pad_ragged(values, np.array([3, 0, 1]), cap=2)
    assert padded.shape == (3, 2, 2) and padded.dtype == torch.float16
    assert mask.tolist() == [[True, True], [False, False], [True, False]]
    assert padded[0].tolist() == [[1, 1], [1, 1]] and padded[2, 1].tolist() == [0, 0]
    assert pad_ragged(np.zeros((0, 4)), np.array([0]))[0].shape == (1, 1, 4)  # an all-empty batch keeps a slot
    full, full_mask = pad_ragged(np.arange(12.0).reshape(6, 2), np.array([2, 2, 2]))  # every item full: a reshape
    assert full.shape == (3, 2, 2) and full_mask.all() and full[2, 1].tolist() == [10, 11]


def test_batch_collates_ragged_columns_with_masks_caps_and_the_guide_joined_by_key():
    main, guide = split_with_regions()
    inputs = feature_inputs(Pool, PoolArgs(max_regions=2, max_tokens=2), main, guide)
    batch = inputs.batch(np.array([2, 0, 1]))  # taken in row order: captions 0, 1, 2 -> images 0, 0, 1
    assert batch["ids"].tolist() == [0, 0, 1]
    assert batch["regions"].shape == (3, 2, 3)  # image 0 has 3 regions, capped at 2
    assert batch["region_mask"].tolist() == [[True, True], [True, True], [False, False]]
    assert batch["regions"][0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert batch["boxes"].shape == (3, 2, 4) and "boxes_mask" not in batch
    assert batch["tokens"].shape == (3, 2, 2)  # caption 1 has 3 tokens, capped at 2
    assert batch["token_mask"].tolist() == [[True, False], [True, True], [True, True]]
    assert batch["tokens"][2, :, 0].tolist() == [2, 2]
    assert batch["guide"][:, 0].tolist() == [20.0, 20.0, 30.0]  # keys a, a, b, found in the guide's own order
    assert batch["captions"] == ["one", "two", "three"]


def test_a_guide_column_without_a_guide_store_is_refused():
    main, _ = split_with_regions()
    with pytest.raises(ValueError, match="guide store: set train.guide"):
        feature_inputs(Pool, PoolArgs(), main, None)


def test_a_phase_freezes_exactly_what_it_does_not_name():
    method = Pool(PoolArgs(), {})
    count = apply_phase(method, PhaseConfig("text only", 1, 0.1, ["text_proj"]))
    assert count == 2 * 4 + 4
    assert all(p.requires_grad for p in method.text_proj.parameters())
    assert not any(p.requires_grad for p in method.image_proj.parameters())
    apply_phase(method, PhaseConfig("all", 1, 0.1, ["*"]))
    assert all(p.requires_grad for p in method.parameters())
    with pytest.raises(ValueError, match="has no module 'image_prj'"):
        apply_phase(method, PhaseConfig("typo", 1, 0.1, ["image_prj"]))
    phases = phases_of(method, {"phases": [{"name": "a", "epochs": 2, "train": ["text_proj"]},
                                           {"name": "b", "epochs": 1, "lr": 0.5}], "epochs": 9, "lr": 0.01})
    assert [(p.name, p.epochs, p.lr) for p in phases] == [("a", 2, 0.01), ("b", 1, 0.5)]
    assert [phase_at(phases, e) for e in range(3)] == [0, 0, 1]
    groups = method.param_groups(phases[0])
    assert groups[0]["lr"] == 0.01


def test_the_method_state_is_in_its_state_dict():
    method = Pool(PoolArgs(), {})
    method.prototypes.normal_()
    fresh = Pool(PoolArgs(), {})
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.prototypes, method.prototypes)


QUEUES = {"image": 3, "text": 3, "image_concept": 2, "text_concept": 5}


def _global(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {name: torch.randn(4, dim, generator=g) for name, dim in QUEUES.items()}


def _four_queue_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    state = MomentumState(Pool(PoolArgs(), {}), ema=("image_proj",), queues=QUEUES, queue_size=8)
    for step in range(5):
        keys = {n: k[rank * 2:(rank + 1) * 2] for n, k in _global(step).items()}
        ids = {n: torch.arange(4)[rank * 2:(rank + 1) * 2] + 10 * step + i for i, n in enumerate(QUEUES)}
        state.enqueue(keys, ids)
    torch.save(state.state_dict(), f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_four_queues_stay_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(_four_queue_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    single = MomentumState(Pool(PoolArgs(), {}), ema=("image_proj",), queues=QUEUES, queue_size=8)
    for step in range(5):
        single.enqueue(_global(step), {n: torch.arange(4) + 10 * step + i for i, n in enumerate(QUEUES)})
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name in single.state_dict():
        assert torch.equal(states[0][name], states[1][name]), name  # queue_sync_error 0
        assert torch.equal(states[0][name], single.state_dict()[name]), name
    assert set(QUEUES) == {k.split(".")[1] for k in states[0] if k.startswith("queues.")}


class Reranker(Method):
    """Global scores are plain dot products; the rerank prefers the gallery item with the highest index."""

    Args = PoolArgs

    @classmethod
    def columns(cls, args):
        return []

    def rerank(self, inputs, direction, rows, candidates):
        return candidates.float()


def test_two_stage_eval_counts_a_positive_outside_the_candidates_as_a_miss():
    img = torch.eye(4)
    # caption j belongs to image j; caption 3 points away from its image, so its image is not in its top-2
    txt = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0.5, 0]])
    inputs = type("Inputs", (), {"caption_image": np.arange(4)})()
    ec = EvalConfig()
    ec.rerank_k.i2t, ec.rerank_k.t2i = 2, 2
    metrics, (i2t, t2i) = two_stage_eval(Reranker(PoolArgs(), {}), inputs, img, txt, ec)
    assert t2i[3] == 4  # the gallery size: a miss at every K, never a hit
    assert metrics["t2i_candidate_recall"] == 75.0
    assert metrics["t2i_R@1"] <= 75.0 and np.all(t2i[:3] < 2)  # the three others are among their candidates
    assert i2t.tolist() == [1, 0, 1, 4]  # image 3's only caption is not among its candidates


def test_prefetch_yields_everything_in_order_and_raises_errors():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise RuntimeError("bad row 7")

    with pytest.raises(RuntimeError, match="bad row 7"):
        list(prefetch(broken(), depth=2))
