"""`itr compare` without Ray: per-method configs, the checks made before Ray starts (unknown names, missing
methods, styles off the synthetic set), caption-style and transfer test sets, the table and robustness outputs,
and the train time that adds the trainings a method builds on."""
from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest

from pipeline.compare import (
    check_compare,
    method_config,
    metric_row,
    other_test_sets,
    safe_name,
    shared_config,
    style_config,
    train_seconds,
    write_other_tests,
    write_table,
)
from pipeline.config import ConfigError, load_config
from pipeline.methods import METHODS


@pytest.fixture
def unwritten_method():
    METHODS.register("not_yet", "pipeline.methods.not_yet_written")
    yield "not_yet"
    METHODS._entries.pop("not_yet", None)


def test_method_config_takes_the_methods_own_arguments_and_overrides():
    cfg = load_config(None, ["train.epochs=7", "train.method_args={embed_dim: 3}",
                             "train.phases=[{name: a, epochs: 1}]", "compare.method_args.vse={margin: 0.5}",
                             "compare.train.vse={epochs: 2}"])
    vse, infonce = method_config(cfg, "vse").train, method_config(cfg, "infonce").train
    assert (vse.method, vse.method_args, vse.epochs, vse.phases) == ("vse", {"margin": 0.5}, 2, [])
    assert (infonce.method, infonce.method_args, infonce.epochs) == ("infonce", {}, 7)
    with pytest.raises(ConfigError, match="unknown config key compare.train.vse.epoch "):
        method_config(load_config(None, ["compare.train.vse={epoch: 2}"]), "vse")


def test_the_shared_chain_ignores_train_method():
    from pipeline.stages import plan

    cfg = load_config(None, ["train.method=not_a_method", "train.batch_size=250"])
    assert plan(shared_config(cfg), "train") == ["synth", "shard", "extract", "train"]


def test_check_lists_missing_methods_and_rejects_unknown_ones(unwritten_method):
    cfg = load_config(None, [f"compare.methods=[vse, {unwritten_method}, infonce]"])
    assert check_compare(cfg) == (["vse", "infonce"], [unwritten_method])
    with pytest.raises(ConfigError, match="compare.methods: unknown method 'nope'"):
        check_compare(load_config(None, ["compare.methods=[vse, nope]"]))
    with pytest.raises(ConfigError, match="compare.method_args.vsee: unknown method"):
        check_compare(load_config(None, ["compare.methods=[vse]", "compare.method_args.vsee={margin: 1}"]))
    with pytest.raises(ValueError, match="margin: expected a number"):
        check_compare(load_config(None, ["compare.methods=[vse]", "compare.method_args.vse={margin: wide}"]))
    with pytest.raises(ConfigError, match="synthetic set only"):
        check_compare(load_config(None, ["data.source=coco", "compare.test_styles=[partial]"]))
    with pytest.raises(ConfigError, match="compare.test_styles\\[0\\]: expected one of precise, partial"):
        load_config(None, ["compare.test_styles=[vague]"])


def test_style_config_is_a_sibling_dataset_with_the_same_scenes():
    cfg = load_config(None, ["workdir=/tmp/w", "data.synth.num_train=9"])
    partial = style_config(cfg, "partial")
    assert (partial.data.name, partial.data.synth.caption_style, partial.data.synth.num_train) == (
        "synthetic-partial", "partial", 9)
    assert str(partial.data_root).endswith("data/synthetic-partial") and style_config(cfg, "precise") is cfg
    rooted = style_config(load_config(None, ["data.root=/d/synth/"]), "ambiguous")
    assert rooted.data.root == "/d/synth-ambiguous"


def test_other_test_sets_are_styles_and_other_datasets():
    cfg = load_config(None, ["eval.protocol=coco-5k", "compare.test_styles=[precise, ambiguous]",
                             "compare.test_data=[{source: flickr8k, name: flickr8k, root: /data/flickr8k}]"])
    sets = other_test_sets(cfg)
    assert list(sets["robustness"]) == ["precise", "ambiguous"] and sets["robustness"]["precise"] is cfg
    transfer = sets["transfer"]["flickr8k"]
    assert (transfer.data.source, transfer.eval.protocol, transfer.train) == ("flickr8k", "generic", cfg.train)
    taken = load_config(None, ["compare.test_styles=[partial]", "compare.methods=[vse]",
                               "compare.test_data=[{name: synthetic-partial}]"])
    with pytest.raises(ConfigError, match="compare.test_data\\[0\\].name: 'synthetic-partial' is taken"):
        check_compare(taken)


ROWS = [
    {"model": "vse", "kind": "trained", "i2t_R@1": 10.0, "i2t_R@5": 30.0, "i2t_R@10": 40.0, "t2i_R@1": 8.0,
     "t2i_R@5": 25.0, "t2i_R@10": 35.0, "rsum": 148.0, "i2t_mAP@100": 50.0, "train_seconds": 12.5,
     "eval_seconds": 0.25, "params": 1234567},
    {"model": "clip (zero-shot)", "kind": "zero-shot", "i2t_R@1": 2.0, "i2t_R@5": 6.0, "i2t_R@10": 9.0,
     "t2i_R@1": 1.0, "t2i_R@5": 5.0, "t2i_R@10": 8.0, "rsum": 31.0, "eval_seconds": 0.01},
    {"model": "perfect-model ceiling", "kind": "ceiling", "i2t_R@1": 90.0, "t2i_R@1": 95.0},
    {"model": "coder (not implemented yet)", "kind": "missing"},
]


def test_table_has_every_row_and_column(tmp_path):
    table = write_table(tmp_path, ROWS, [1, 5, 10], "synthetic test (generic)", ["coder"])
    lines = table.splitlines()
    assert lines[0].split(" | ")[1:4] == ["i2t_R@1", "i2t_R@5", "i2t_R@10"]
    assert "i2t_mAP@100" in lines[0] and lines[0].endswith("| train (s) | eval (s) | params |")
    assert "| vse | 10.0 | 30.0 | 40.0 | 8.0 | 25.0 | 35.0 | 148.0 | 50.0 | 12.5 | 0.25 | 1,234,567 |" in lines
    assert lines[-1].startswith("| coder (not implemented yet) |  |")
    with (tmp_path / "table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["kind"] for r in rows] == ["trained", "zero-shot", "ceiling", "missing"]
    assert rows[0]["rsum"] == "148.0" and rows[3]["rsum"] == ""
    assert (tmp_path / "table.png").stat().st_size > 0 and (tmp_path / "table.md").read_text().startswith("# ")


def test_robustness_table_has_a_column_group_per_style(tmp_path):
    styles = {"precise": {"vse": {"i2t_R@1": 10.0, "t2i_R@1": 8.0, "rsum": 148.0}},
              "ambiguous": {"vse": {"i2t_R@1": 3.0, "t2i_R@1": 2.0, "rsum": 60.0},
                            "perfect-model ceiling": {"i2t_R@1": 4.0, "t2i_R@1": 12.0}}}
    table = write_other_tests(tmp_path, "robustness", styles, ["precise", "ambiguous"])
    assert "| vse | 10.0 | 8.0 | 148.0 | 3.0 | 2.0 | 60.0 |" in table
    assert "| perfect-model ceiling |  |  |  | 4.0 | 12.0 |  |" in table
    assert {p.name for p in tmp_path.iterdir()} == {"robustness.md", "robustness.csv", "robustness.png"}


def test_metric_row_keeps_table_metrics_only():
    metrics = {"i2t_R@1": 1.0, "rsum": 2.0, "t2i_mAP@100": 3.0, "i2t_P@100": 4.0, "i2t_medr": 5.0,
               "two_stage_rsum": 6.0, "two_stage_i2t_R@5": 7.0, "embed_seconds": 8.0}
    assert metric_row(metrics) == {"i2t_R@1": 1.0, "rsum": 2.0, "t2i_mAP@100": 3.0, "i2t_P@100": 4.0}
    assert metric_row(metrics, "two_stage_") == {"rsum": 6.0, "i2t_R@5": 7.0}
    assert safe_name("open_clip:ViT-B-32:x.pt (zero-shot)") == "open_clip_ViT-B-32_x.pt _zero-shot_"


def test_train_time_adds_the_trainings_a_method_builds_on():
    def run(seconds, stage, upstream=""):
        return SimpleNamespace(data=SimpleNamespace(metrics={} if seconds is None else {"train_seconds": seconds},
                                                    tags={"itr.stage": stage, "itr.upstream": upstream}))

    runs = {"scl": run(3.0, "train", "ext,text,image"), "text": run(10.0, "train", "ext"),
            "image": run(20.0, "train", "ext"), "ext": run(None, "extract")}
    client = SimpleNamespace(get_run=runs.__getitem__)
    assert train_seconds(client, "scl") == 33.0 and train_seconds(client, "text") == 10.0
