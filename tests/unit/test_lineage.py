"""Lineage and run descriptions without Ray: output folders from the stage records, the text of `itr lineage`,
stage-run descriptions with upstream links, parent-run names; and the commands that
need no run: `itr --version`, `itr config`, every enumerated config value checked up front, each tool's help."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import yaml

from pipeline.cli import TOOLS, main
from pipeline.config import load_config, to_dict
from pipeline.tracking.lineage import StageRun, format_chain, stage_outputs, ui_base
from pipeline.tracking.runs import parent_run_name, stage_note


def record(folder, run_id: str, stage: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stage.json").write_text(json.dumps({"stage": stage, "run_id": run_id, "fingerprint": "f"}))


def test_stage_outputs_come_from_the_stage_records_of_the_workdir(tmp_path):
    cfg = load_config(None, [f"workdir={tmp_path}"])
    record(tmp_path / "shards" / "synthetic", "r-shard", "shard")
    record(tmp_path / "data" / "synthetic", "r-synth", "synth")
    record(tmp_path / "features" / "synthetic" / "abc" / "inputs" / "def", "r-extract", "extract")
    record(tmp_path / "train" / "t1", "r-train", "train")
    record(tmp_path / "eval" / "e1", "r-eval", "eval")
    (tmp_path / "train" / "t2").mkdir()
    (tmp_path / "train" / "t2" / "stage.json").write_text("{not json")  # a record being written: ignored
    outputs = stage_outputs(to_dict(cfg))
    assert outputs == {"r-shard": tmp_path / "shards" / "synthetic", "r-synth": tmp_path / "data" / "synthetic",
                       "r-extract": tmp_path / "features" / "synthetic" / "abc" / "inputs" / "def",
                       "r-train": tmp_path / "train" / "t1", "r-eval": tmp_path / "eval" / "e1"}


def test_lineage_text_has_one_block_per_stage_with_its_links():
    rows = [StageRun("eval", "e" * 32, "eval", "FINISHED", "fe", None, ["synthetic-test@d1"], "/w/eval/fe",
                     "http://127.0.0.1:5000/#/experiments/1/runs/" + "e" * 32),
            StageRun("train", "t" * 32, "train (cached)", "FINISHED", "ft", "p" * 32, [], None, "link")]
    text = format_chain(rows)
    assert text.splitlines()[0].startswith("eval     run " + "e" * 32 + "  finished")
    assert "input        synthetic-test@d1" in text and "output       /w/eval/fe" in text
    assert "cached from  " + "p" * 32 in text and "output       -" in text
    assert "mlflow       http://127.0.0.1:5000/#/experiments/1/runs/" + "e" * 32 in text


def test_ui_base_is_the_tracking_server_or_a_local_mlflow_ui(monkeypatch):
    monkeypatch.delenv("ITR_MLFLOW_UI", raising=False)
    assert ui_base("http://mlflow.internal:5000/") == "http://mlflow.internal:5000"
    assert ui_base("sqlite:////w/mlflow.db") == "http://127.0.0.1:5000"
    monkeypatch.setenv("ITR_MLFLOW_UI", "http://127.0.0.1:5001/")
    assert ui_base("sqlite:////w/mlflow.db") == "http://127.0.0.1:5001"


class FakeClient:
    def __init__(self, runs: dict):
        self.runs = runs

    def get_run(self, run_id):
        if run_id not in self.runs:
            raise KeyError(run_id)
        return self.runs[run_id]


def fake_run(run_id: str, tags: dict, experiment_id: str = "3"):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id, run_name=tags["itr.stage"]),
                           data=SimpleNamespace(tags=tags))


def test_stage_note_links_every_upstream_run_the_producer_and_the_output():
    shard = fake_run("s1", {"itr.stage": "shard"})
    extract = fake_run("x1", {"itr.stage": "extract", "itr.fingerprint": "fx", "itr.upstream": "s1,gone",
                              "itr.cached_from": "x0"})
    note = stage_note(FakeClient({"s1": shard}), extract, "/w/features/x")
    assert "**extract** stage, output fingerprint `fx`." in note
    view = "?workflowType=machine_learning"  # MLflow 3.17's model-training view
    assert f"[x0](#/experiments/3/runs/x0{view})" in note  # the run that produced the cached output
    assert f"[shard `s1`](#/experiments/3/runs/s1{view})" in note and "`gone`" in note  # a deleted run: no link
    assert note.endswith("Output: `/w/features/x`")
    assert "none (a source stage)" in stage_note(FakeClient({}), fake_run("y", {"itr.stage": "synth"}))


def test_parent_runs_are_named_after_command_and_config():
    assert parent_run_name("run", "jobs/configs/demo.yaml", ["train.epochs=4"]) == "itr run demo.yaml train.epochs=4"
    assert parent_run_name("eval --zero-shot", "/x/tiny.yaml") == "itr eval --zero-shot tiny.yaml"
    assert len(parent_run_name("run", "c.yaml", ["workdir=" + "x" * 400])) == 250


def test_version(capsys):
    from pipeline import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"itr {__version__}"


def test_config_prints_the_resolved_yaml_that_loads_back_the_same(tmp_path, capsys):
    assert main(["config", "jobs/configs/tiny.yaml", "train.epochs=3", f"workdir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(printed)
    assert yaml.safe_load(printed)["train"]["epochs"] == 3
    assert to_dict(load_config(resolved)) == to_dict(load_config("jobs/configs/tiny.yaml",
                                                                 ["train.epochs=3", f"workdir={tmp_path}"]))


@pytest.mark.parametrize("override, message", [
    ("features.extractor=clip", "features.extractor: unknown extractor 'clip' (known: hf, open_clip)"),
    ("data.source=cocoo", "data.source: unknown data source 'cocoo'"),
    ("train.guide={extractor: hff}", "train.guide.extractor: unknown extractor 'hff'"),
    ("eval.zero_shot=[{model: x, precision: fp8}]", "eval.zero_shot[0].precision: expected one of auto, fp32"),
    ("train.method=vsepp", "train.method: unknown method 'vsepp'"),
    ("eval.protocol=coco", "eval.protocol: expected one of"),
])
def test_every_enumerated_value_is_checked_before_anything_runs(tmp_path, capsys, override, message):
    assert main(["run", "jobs/configs/tiny.yaml", f"workdir={tmp_path / 'w'}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", list(TOOLS) + ["config"])
def test_result_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: itr " + command in capsys.readouterr().out
