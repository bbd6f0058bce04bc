"""NUS-WIDE source and the NUS-WIDE-10k selection on fixtures written in the upstream release layout."""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.sample import Sample
from pipeline.data.sources import load_samples as load_source
from pipeline.data.sources import nuswide

CONCEPTS = ["animal", "buildings", "clouds", "grass", "lake", "person", "plants", "sky", "toy", "water", "window",
            "zebra"]


@dataclass
class Entry:
    """One image of a fixture: its Imagelist.txt line, its concepts, its All_Tags.txt line and split list."""

    path: str  # Windows style, as in Imagelist.txt
    labels: list[str]
    tags: bytes
    split: str | None = "train"  # "test", "both" or None (neither) for the official lists


def entry(folder: str, n: int, photo_id: str, labels: list[str], tags: str | bytes = "", split: str | None = "train"):
    line = tags if isinstance(tags, bytes) else f"{photo_id}      {tags}".encode()
    return Entry(f"{folder}\\{n:04d}_{photo_id}.jpg", labels, line, split)


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_release(root: Path, entries: list[Entry], concepts: list[str] = CONCEPTS) -> Path:
    """Writes the NUS-WIDE layout (CRLF line ends, as the release's Windows files) and a JPEG per image."""
    data = jpeg_bytes()
    for e in entries:
        image = root / "Flickr" / e.path.replace("\\", "/")
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(data)
    (root / "Concepts81.txt").write_text("".join(f"{c}\r\n" for c in concepts))
    (root / "ImageList").mkdir()
    (root / "ImageList" / "Imagelist.txt").write_text("".join(f"{e.path}\r\n" for e in entries))
    (root / "ImageList" / "TrainImagelist.txt").write_text(  # with the release's absolute prefix
        "".join(f"C:\\ImageData\\Flickr\\{e.path}\r\n" for e in entries if e.split in ("train", "both")))
    (root / "ImageList" / "TestImagelist.txt").write_text(
        "".join(f"{e.path}\r\n" for e in entries if e.split in ("test", "both")))
    (root / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for c in concepts:
        (root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt").write_text(
            "".join("1\r\n" if c in e.labels else "0\r\n" for e in entries))
    (root / "NUS_WID_Tags").mkdir()
    (root / "NUS_WID_Tags" / "All_Tags.txt").write_bytes(b"".join(e.tags + b"\r\n" for e in entries))
    return root


GOOD = [
    entry("actor", 1, "2124494179", ["person"], "actor  beatles\tmusic"),
    entry("actor", 2, "174174086", ["person", "sky"], "concert", split="test"),
    entry("airport", 1, "2395631289", ["clouds", "sky"], "airplane sky"),
    entry("beach", 1, "100000", [], "sea sand", split="test"),
]
BAD = {
    "photo 555 has no tags": entry("beach", 2, "555", ["water"], b"555      "),
    "is not UTF-8": entry("beach", 3, "556", ["water"], b"556      caf\xe9 plage"),
    "is for photo 999": entry("beach", 4, "557", ["water"], b"999      sea"),
    "not allowed": entry("beach", 5, "12.5", ["water"], "sea"),
    "duplicate key 'nuswide-2124494179'": entry("band", 1, "2124494179", ["person"], "band"),
    "in neither TrainImagelist.txt nor TestImagelist.txt": entry("beach", 6, "558", ["water"], "sea", split=None),
    "in both TrainImagelist.txt and TestImagelist.txt": entry("beach", 7, "559", ["water"], "sea", split="both"),
}


@pytest.fixture
def release(tmp_path) -> Path:
    return write_release(tmp_path / "nuswide", GOOD)


def test_reads_samples_labels_captions_and_official_split(release):
    samples, rejected = nuswide.load_samples(release, "nuswide")
    assert rejected == []
    assert [s.key for s in samples] == ["nuswide-2124494179", "nuswide-174174086", "nuswide-2395631289",
                                        "nuswide-100000"]
    first = samples[0]
    assert first.image == str(release / "Flickr" / "actor" / "0001_2124494179.jpg") and Path(first.image).is_file()
    assert first.captions == ["actor beatles music"]
    assert first.meta == {"photo_id": "2124494179", "filename": "0001_2124494179.jpg", "filepath": "actor"}
    assert [s.labels for s in samples] == [["person"], ["person", "sky"], ["clouds", "sky"], []]
    assert [s.split for s in samples] == ["train", "test", "train", "test"]  # train list has the C:\ prefix
    assert nuswide.read_concept_labels(release)["0002_174174086.jpg"] == ["person", "sky"]


def test_concepts_file_may_sit_in_concepts_list_folder(release):
    (release / "ConceptsList").mkdir()
    (release / "Concepts81.txt").rename(release / "ConceptsList" / "Concepts81.txt")
    assert nuswide.load_samples(release, "nuswide")[0][1].labels == ["person", "sky"]


def test_without_official_lists_a_seeded_split_with_the_official_test_share(release):
    for name in ("TrainImagelist.txt", "TestImagelist.txt"):
        (release / "ImageList" / name).unlink()
    splits = [[s.split for s in nuswide.load_samples(release, "nuswide")[0]] for _ in range(2)]
    assert splits[0] == splits[1] and Counter(splits[0]) == {"train": 2, "test": 2}  # round(4 * 0.4) test


def test_bad_lines_are_rejected_with_reasons_and_the_rest_load(tmp_path):
    root = write_release(tmp_path / "nuswide", GOOD + list(BAD.values()))
    samples, rejected = nuswide.load_samples(root, "nuswide")
    assert [s.key for s in samples] == [f"nuswide-{e.tags.split()[0].decode()}" for e in GOOD]
    assert len(rejected) == len(BAD)
    for (reason, _), r in zip(BAD.items(), rejected):
        assert reason in r.reason
    assert rejected[0].item == "nuswide-555" and rejected[3].item == "Imagelist.txt#8"


def test_one_official_list_without_the_other_names_the_missing_one(release):
    (release / "ImageList" / "TestImagelist.txt").unlink()
    with pytest.raises(FileNotFoundError, match="TestImagelist.txt"):
        nuswide.load_samples(release, "nuswide")


@pytest.mark.parametrize("missing", ["Concepts81.txt", "ImageList/Imagelist.txt",
                                     "Groundtruth/AllLabels/Labels_sky.txt", "NUS_WID_Tags/All_Tags.txt"])
def test_missing_layout_file_is_named(release, missing):
    (release / missing).unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        nuswide.load_samples(release, "nuswide")


@pytest.mark.parametrize("path, extra, message", [
    ("Groundtruth/AllLabels/Labels_sky.txt", b"0\r\n", "Labels_sky.txt: 5 lines, but the image list has 4"),
    ("NUS_WID_Tags/All_Tags.txt", b"1 x\r\n", "All_Tags.txt: 5 lines, but the image list has 4"),
])
def test_wrong_line_count_names_the_file(release, path, extra, message):
    with open(release / path, "ab") as f:
        f.write(extra)
    with pytest.raises(ValueError, match=message):
        nuswide.load_samples(release, "nuswide")
    if path.endswith("Labels_sky.txt"):
        with pytest.raises(ValueError, match="Labels_sky.txt"):
            nuswide.read_concept_labels(release)


def test_label_that_is_not_0_or_1_names_file_and_line(release):
    (release / "Groundtruth" / "AllLabels" / "Labels_toy.txt").write_text("0\r\n0\r\nyes\r\n0\r\n")
    with pytest.raises(ValueError, match="Labels_toy.txt: line 3 is 'yes'"):
        nuswide.load_samples(release, "nuswide")


# ----------------------------------------------------------------------------- NUS-WIDE-10k

BIG = CONCEPTS[:10]  # pools of 20, 22, ..., 38 single-label images
SMALL = CONCEPTS[10:]  # 5 images each, always with a big concept


def ten_k_entries() -> list[Entry]:
    entries, photo = [], 1000
    for i, concept in enumerate(BIG):
        for n in range(20 + 2 * i):
            extra = [SMALL[i % 2]] if n == 0 else []  # another concept outside the 10: still single-label
            entries.append(entry(concept, n + 1, str(photo), [concept, *extra], f"{concept} t{photo}"))
            photo += 1
    for n in range(6):  # two of the 10: never selected
        entries.append(entry("mixed", n + 1, str(photo), BIG[:2], f"mixed t{photo}"))
        photo += 1
    return entries


@pytest.fixture(scope="module")
def ten_k(tmp_path_factory) -> tuple[Path, list[Sample]]:
    root = write_release(tmp_path_factory.mktemp("nuswide10k") / "nuswide", ten_k_entries())
    samples, rejected = nuswide.load_samples(root, "nuswide")
    assert rejected == []
    return root, samples


def test_ten_k_takes_the_10_largest_concepts_single_label_only(ten_k):
    _, samples = ten_k
    selected = nuswide.select_nuswide10k(samples)
    by_key = {s.key: s for s in samples}
    assert {s.labels[0] for s in selected} == set(BIG) and all(len(s.labels) == 1 for s in selected)
    for s in selected:
        assert [c for c in by_key[s.key].labels if c in BIG] == s.labels
        assert s.meta["concepts"] == by_key[s.key].labels
    assert not any("mixed" in s.image for s in selected)
    assert len(selected) == len({s.key for s in selected})
    assert [s.split for s in samples] == [s.split for s in nuswide.load_samples(ten_k[0], "nuswide")[0]]  # untouched


def test_ten_k_scales_down_to_the_smallest_pool_stratified_80_10_10(ten_k):
    _, samples = ten_k
    selected = nuswide.select_nuswide10k(samples)  # smallest pool: 20 -> 16/2/2 per concept
    assert Counter((s.labels[0], s.split) for s in selected) == {
        (c, split): n for c in BIG for split, n in (("train", 16), ("val", 2), ("test", 2))}
    keys = {split: {s.key for s in selected if s.split == split} for split in ("train", "val", "test")}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    assert Counter(s.split for s in nuswide.select_nuswide10k(samples, per_concept=10)) == {
        "train": 80, "val": 10, "test": 10}


def test_ten_k_full_size_is_8000_1000_1000():
    samples = [Sample(f"n-{c}{k}", "x.jpg", ["t"], "train", [c]) for c in BIG for k in range(1100)]
    selected = nuswide.select_nuswide10k(samples)
    assert Counter(s.split for s in selected) == {"train": 8000, "val": 1000, "test": 1000}
    assert Counter((s.labels[0], s.split) for s in selected)[(BIG[3], "val")] == 100


def test_ten_k_is_fixed_by_seed(ten_k):
    _, samples = ten_k

    def picked(seed):
        return sorted((s.key, s.split) for s in nuswide.select_nuswide10k(samples, seed=seed, per_concept=10))

    assert picked(0) == picked(0) == picked(0)
    assert picked(1) != picked(0)
    assert {k for k, _ in picked(1)} != {k for k, _ in picked(0)}  # other images, not only other splits
    assert picked(0) == sorted((s.key, s.split) for s in nuswide.select_nuswide10k(samples[::-1], per_concept=10))


def test_ten_k_too_small_or_too_few_concepts_raise():
    def sample(k, labels):
        return Sample(f"n-{k}", "x.jpg", ["t"], "train", labels)

    with pytest.raises(ValueError, match="needs 10 labelled concepts, the samples have 9"):
        nuswide.select_nuswide10k([sample(f"{c}{k}", [c]) for c in BIG[:9] for k in range(5)])
    starved = [sample(f"{c}{k}", [c]) for c in BIG if c != "lake" for k in range(5)]
    starved += [sample(f"lake{k}", ["lake"]) for k in range(2)] + [sample(f"x{k}", ["lake", "sky"]) for k in range(10)]
    with pytest.raises(ValueError, match="concept 'lake' has 2 samples"):
        nuswide.select_nuswide10k(starved)


def test_sources_registry_knows_nuswide_and_nuswide10k(ten_k):
    root, _ = ten_k
    samples, rejected = load_source("nuswide", root, "nus")
    assert len(samples) == 296 and rejected == []
    selected, _ = load_source("nuswide10k", root, "nus10k")
    assert len(selected) == 200 and all(s.key.startswith("nus10k-") for s in selected)
    assert selected == nuswide.select_nuswide10k(nuswide.load_samples(root, "nus10k")[0], seed=nuswide.SEED)


def test_ten_k_reports_only_the_rejected_lines_it_could_have_selected(tmp_path):
    bad = [entry("animal", 99, "9001", ["animal"], b"9001      "), entry("mixed", 99, "9002", BIG[:2], b"9002      "),
           entry("zoo", 1, "9003", ["zebra"], b"9003      ")]
    selected, rejected = nuswide.load_nuswide10k(write_release(tmp_path / "nuswide", ten_k_entries() + bad), "n")
    assert len(selected) == 200 and [r.item for r in rejected] == ["n-9001"]
