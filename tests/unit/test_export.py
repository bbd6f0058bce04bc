"""Exports other tools read: open_clip_train's `sizes.json` and clip-retrieval's partition naming."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.data.shard import write_sizes
from pipeline.export import first_captions, partition_name


def test_sizes_json_per_split_gives_open_clip_train_its_sample_count(tmp_path):
    manifest = pd.DataFrame({"shard": ["train/shard-000000.tar", "train/shard-000001.tar", "test/shard-000000.tar"],
                             "split": ["train", "train", "test"], "num_samples": [100, 40, 60]})
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    written = write_sizes(tmp_path, manifest)
    assert sorted(str(w) for w in written) == [str(tmp_path / "test" / "sizes.json"),
                                               str(tmp_path / "train" / "sizes.json")]
    from open_clip_train.data import get_dataset_size  # what open_clip_train.main asks without --train-num-samples

    assert get_dataset_size(str(tmp_path / "train" / "shard-{000000..000001}.tar")) == (140, 2)
    assert json.loads((tmp_path / "test" / "sizes.json").read_text()) == {"shard-000000.tar": 60}


@pytest.mark.parametrize("index, count, name", [(0, 1, "0"), (3, 9, "3"), (3, 10, "03"), (42, 120, "042")])
def test_partition_names_are_padded_as_clip_retrieval_pads_them(index, count, name):
    assert partition_name(index, count) == name


def test_first_caption_of_each_image():
    assert first_captions(np.array([0, 0, 1, 2, 2, 2]), 3).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="image row 1 has no caption"):
        first_captions(np.array([0, 2]), 3)
