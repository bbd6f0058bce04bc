"""Config loading: typed sections, overrides, and one clear error per bad key or value."""
from __future__ import annotations

import pytest

from pipeline.config import ConfigError, flatten, load_config, to_dict


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_and_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, "workdir: w\ntrain: {epochs: 3, lr: 2.0e-3}\n"))
    assert cfg.train.epochs == 3 and cfg.train.lr == 2e-3 and cfg.shard.shard_size == 1000
    assert cfg.data_root == (tmp_path.cwd() / "w" / "data" / "synthetic").resolve()


def test_overrides_parse_yaml_values_and_numbers_in_yaml11_form(tmp_path):
    cfg = load_config(write(tmp_path, "{}"), ["train.lr=1e-3", "train.epochs=7", "features.pretrained=/x.pt",
                                              "eval.ks=[1,2]", "train.use_gpu=true"])
    assert cfg.train.lr == 1e-3 and cfg.train.epochs == 7 and cfg.features.pretrained == "/x.pt"
    assert cfg.eval.ks == [1, 2] and cfg.train.use_gpu is True


@pytest.mark.parametrize("text, message", [
    ("trian: {epochs: 1}", "unknown config key trian"),
    ("train: {epochz: 1}", "unknown config key train.epochz"),
    ("train: {epochs: two}", "train.epochs: expected an integer, got 'two'"),
    ("train: {lr: abc}", "train.lr: expected a number"),
    ("train: {use_gpu: 1}", "train.use_gpu: expected true or false"),
    ("train: 5", "train: expected a mapping"),
    ("eval: {ks: 5}", "eval.ks: expected a list"),
    ("train: {batch_size: 100, num_workers: 3}", "train.batch_size: 100 is not divisible"),
    ("train: {phases: [{name: a, epochs: 0}]}", "needs epochs > 0 and a non-empty"),
    ("train: {method_args: 3}", "train.method_args: expected a mapping"),
    ("features: {precision: fp8}", "features.precision"),
    ("features: {min_actors: -1}", "features.min_actors: must be >= 0, got -1"),
    ("features: {min_actors: 4, max_actors: 2}", "exceeds features.max_actors"),
    ("shard: {shard_size: 0}", "shard.shard_size: must be positive"),
    ("eval: {protocol: coco-2k}", "eval.protocol: expected one of coco-1k, coco-5k, f30k-1k, generic"),
    ("eval: {zero_shot: [{model: x, batchsize: 3}]}", "unknown config key eval.zero_shot[0].batchsize"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown config key train.nope"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_zero_shot_list_of_extractor_sections(tmp_path):
    cfg = load_config(write(tmp_path, "eval: {zero_shot: [{extractor: hf, model: /m/clip}, {model: itr-vit-tiny-64}]}"))
    assert [(f.extractor, f.model) for f in cfg.eval.zero_shot] == [("hf", "/m/clip"), ("open_clip", "itr-vit-tiny-64")]


def test_flatten_gives_dotted_params():
    flat = flatten(to_dict(load_config(None)))
    assert flat["train.lr"] == 1e-3 and flat["data.synth.seed"] == 0 and "tracking.uri" in flat


def test_operational_features_leave_the_train_fingerprint_alone():
    """The guide extractor's batch size or actor pool says how it runs, not what it computes."""
    from pipeline.methods.user import UserArgs
    from pipeline.stages.train import train_fingerprint

    def fp(*overrides):
        cfg = load_config(None, ["train.method=user", "train.guide={model: itr-vit-micro-32}", *overrides])
        return train_fingerprint(cfg.train, UserArgs(), features="f")

    assert fp() == fp("train.guide.batch_size=7", "train.guide.max_actors=3", "features.min_actors=2")
    assert fp() != fp("train.guide.model=itr-vit-tiny-64")
