"""The `itr` command line: help for every command, and one clear error + exit 2 for bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cli import COMMANDS, main
from pipeline.data.shard import check_splits
from pipeline.data.sources import load_samples


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert " ".join(COMMANDS[command].split()[:3]) in " ".join(capsys.readouterr().out.split())


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout


def test_unknown_key_exits_2_naming_it(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("workdir: w\ntrain: {epochs: 1, lerning_rate: 0.1}\n")
    assert main(["run", str(cfg)]) == 2
    assert "unknown config key train.lerning_rate" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("train.method_args.temprature=0.1", "unknown config key train.method_args (infonce).temprature"),
    ("train.method=vsepp", "train.method: unknown method 'vsepp'"),
    ("train.method_args.queue_size=100", "train.method_args.queue_size: 100 is not a multiple"),
])
def test_bad_method_or_argument_exits_2_before_ray_starts(tmp_path, capsys, override, message):
    assert main(["run", _write(tmp_path, "{}"), f"workdir={tmp_path / 'w'}", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "w" / "data").exists()  # nothing ran: not even the synth stage


def test_missing_dataset_path_exits_2_before_any_work(tmp_path, capsys):
    assert main(["run", _write(tmp_path, "data: {source: coco, root: /nonexistent/coco}"),
                 f"workdir={tmp_path / 'w'}"]) == 2
    assert "data.root: dataset folder not found: /nonexistent/coco" in capsys.readouterr().err
    assert not (tmp_path / "w" / "shards").exists()


def test_unwritable_workdir_exits_2(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["synth", _write(tmp_path, "{}"), f"workdir={tmp_path / 'file' / 'w'}"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_empty_split_is_named(tmp_path):
    """A COCO Karpathy file with no test image fails the split check, naming the split."""
    root = tmp_path / "coco"
    root.mkdir()
    (root / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 1, "imgid": 0, "split": "train",
         "sentences": [{"raw": "a cat"}]}]}))
    samples, rejected = load_samples("coco", root, "coco")
    assert not rejected
    check_splits({s.split for s in samples}, ["train"])
    with pytest.raises(ValueError, match="split 'test' is empty"):
        check_splits({s.split for s in samples}, ["train", "test"])


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    return str(path)
