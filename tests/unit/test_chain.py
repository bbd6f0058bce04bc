"""The chain, declared once (`pipeline.stages.plan`): which stages a config runs, and the errors of a chain that
cannot be built, all before Ray starts; one registry shape for methods, sources, extractors and stages."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipeline.config import load_config
from pipeline.data.sources import SOURCES
from pipeline.features.extractors import EXTRACTORS
from pipeline.methods import METHODS, register_method
from pipeline.methods.base import Column, Method
from pipeline.stages import STAGES, plan


@dataclass
class GuideArgs:
    pass


class GuidedMethod(Method):
    Args = GuideArgs

    @classmethod
    def columns(cls, args):
        return [Column("image_embed", "images"), Column("image_embed", "images", key="guide", store="guide"),
                Column("text_embed", "captions")]


if "test_guided" not in METHODS:
    register_method("test_guided")(GuidedMethod)


@pytest.mark.parametrize("overrides, last, zero_shot, want", [
    ([], "eval", False, ["synth", "shard", "extract", "train", "eval"]),
    ([], "extract", False, ["synth", "shard", "extract"]),
    ([], "shard", True, ["synth", "shard", "zero-shot"]),
    (["train.method=clip_finetune"], "eval", False, ["synth", "shard", "train-shards", "eval"]),
    (["train.method=clip_finetune"], "extract", False, ["synth", "shard", "extract"]),
    (["data.source=precomp", "data.root=/x"], "eval", False, ["import", "train", "eval"]),
    (["data.source=coco", "data.root=/x"], "train", False, ["shard", "extract", "train"]),
    (["train.method=test_guided", "train.guide={model: itr-vit-micro-32}"], "eval", False,
     ["synth", "shard", "extract", "guide", "train", "eval"]),
])
def test_plan(overrides, last, zero_shot, want):
    assert plan(load_config(None, overrides), last, zero_shot) == want
    assert all(name in STAGES for name in want)


@pytest.mark.parametrize("overrides, last, message", [
    (["train.method=test_guided"], "train", "reads a guide store: set train.guide"),
    (["data.source=precomp", "data.root=/x", "train.method=clip_finetune"], "eval", "trains on images"),
    (["data.source=precomp", "data.root=/x"], "shard", "holds features, not images"),
    (["data.source=coco", "data.root=/x"], "synth", "itr synth needs data.source=synthetic"),
    (["train.method=nope"], "eval", "train.method: unknown method 'nope' (known: "),
    ([], "deploy", "unknown stage 'deploy'"),
])
def test_a_chain_that_cannot_be_built_is_refused(overrides, last, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(load_config(None, overrides), last)


@pytest.mark.parametrize("registry, key", [(METHODS, "train.method"), (SOURCES, "data.source"),
                                           (EXTRACTORS, "features.extractor"), (STAGES, "stage")])
def test_every_registry_names_the_key_and_the_known_names(registry, key):
    with pytest.raises(ValueError, match=f"{key}: unknown .* 'nope' \\(known: {registry.names()[0]}"):
        registry.get("nope")
