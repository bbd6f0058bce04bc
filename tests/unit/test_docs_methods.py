"""docs/methods.md stays true to the code: its worked example (the method, its optional rerank and its unit test)
is executed as written."""
from __future__ import annotations

import re
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import torch

DOC = Path(__file__).parents[2] / "docs" / "methods.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_worked_example_runs_as_written():
    from pipeline.methods import METHODS

    blocks = python_blocks()
    method_src = next(b for b in blocks if '@register_method("mean_pool")' in b)
    rerank_src = next(b for b in blocks if b.startswith("    @torch.no_grad()\n    def rerank"))
    test_src = next(b for b in blocks if "def test_mean_pool_one_step" in b)
    if "mean_pool" not in METHODS:
        module = types.ModuleType("docs_mean_pool")  # a real module: dataclasses and type hints look it up
        sys.modules[module.__name__] = module
        exec(compile(method_src, str(DOC), "exec"), module.__dict__)
    cls = METHODS.get("mean_pool")
    rerank_ns = dict(vars(__import__("pipeline.methods.base", fromlist=["x"])), np=np, F=torch.nn.functional,
                     torch=torch)
    exec(compile(textwrap.dedent(rerank_src), str(DOC), "exec"), rerank_ns)
    cls.rerank = rerank_ns["rerank"]
    try:
        test_ns: dict = {}
        exec(compile(test_src, str(DOC), "exec"), test_ns)
        test_ns["test_mean_pool_one_step"]()
        from tests.method_fixtures import ArraySplit, feature_inputs

        rng = np.random.default_rng(1)
        split = ArraySplit({"roi_feats": [rng.standard_normal((n, 8)) for n in (2, 1, 3, 2)]},
                           {"text_tokens": [rng.standard_normal((n, 6)) for n in (3, 2, 4, 1)]}, np.arange(4))
        method = cls(cls.Args(embed_dim=16, queue_size=0), {"regions": 8, "tokens": 6})
        scores = method.rerank(feature_inputs(cls, method.args, split), "t2i", torch.tensor([0, 1]),
                               torch.tensor([[0, 1, 2], [3, 2, 1]]))
        assert scores.shape == (2, 3) and bool(torch.isfinite(scores).all())
    finally:
        cls.rerank = None
