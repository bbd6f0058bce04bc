"""Caption styles of the synthetic set (`data.synth.caption_style`): `precise` is byte-identical to the captions
and images generated before styles existed (every cached dataset stays valid), the other styles change the
captions only, every caption is consistent with its scene, and vaguer captions lower the retrieval ceiling."""
from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.sources import synthetic
from pipeline.data.sources.synthetic import CaptionMeaning, ObjectMention, Scene, SceneObject, is_consistent

# sha256 of the captions and pixels of images 0..149 (seed 0, 32 px, max_objects 1, 3 and 6), computed with the code
# before caption styles existed (commit 40cd6ce)
PRECISE_DIGEST = "1fcef281040fe56a49a581da458fa2e9da6b954673f59810a16258ac36cd4404"


def digest_of(style: str = "precise") -> str:
    h = hashlib.sha256()
    for max_objects in (1, 3, 6):
        for index in range(150):
            _, captions, image = synthetic.make_image(0, index, 32, max_objects, style)
            h.update(("\n".join(c.text for c in captions) + "|" + image.tobytes().hex() + "\n").encode())
    return h.hexdigest()


def test_precise_is_byte_identical_to_the_captions_before_styles():
    assert digest_of() == PRECISE_DIGEST


@pytest.mark.parametrize("style", ["partial", "ambiguous"])
def test_other_styles_change_captions_only_and_stay_consistent(style):
    vague = 0
    for index in range(80):
        scene, precise, image = synthetic.make_image(2, index, 32, 3)
        scene_s, captions, image_s = synthetic.make_image(2, index, 32, 3, style)
        assert scene_s == scene and image_s.tobytes() == image.tobytes()
        assert len(captions) == 5 and {c.text for c in captions}.isdisjoint(c.text for c in precise)
        for caption in captions:
            assert is_consistent(caption.meaning, scene), caption.text
            vague += not caption.meaning.complete
    assert vague > 0
    if style == "partial":
        assert all(c.text.endswith(" ...") for c in captions)


def test_an_incomplete_meaning_fits_scenes_with_more_objects():
    red = SceneObject("circle", "red", "small", "left")
    blue = SceneObject("square", "blue", "large", "top")
    says_red = CaptionMeaning((ObjectMention(colour="red"),), complete=False)
    assert is_consistent(says_red, Scene((red, blue))) and is_consistent(says_red, Scene((red,)))
    assert not is_consistent(CaptionMeaning((ObjectMention(colour="red"),)), Scene((red, blue)))  # complete: count
    assert not is_consistent(says_red, Scene((blue,)))
    ceiling = synthetic.retrieval_ceiling([Scene((red, blue)), Scene((red,)), Scene((blue,))],
                                          [[says_red], [says_red], [CaptionMeaning((ObjectMention(),))]])
    # "red" fits scenes 0 and 1; "one object" (complete) fits the one-object scenes 1 and 2: 1/2 each
    assert ceiling["t2i_R@1"] == pytest.approx(50.0)


def test_vaguer_styles_lower_the_ceiling_and_are_recorded(tmp_path):
    ceilings = {}
    for style in ("precise", "partial", "ambiguous"):
        summary = synthetic.generate(tmp_path / style, seed=1, num_train=0, num_val=0, num_test=60, image_size=32,
                                     max_objects=2, caption_style=style, progress=False)
        ceilings[style] = synthetic.read_ceiling(tmp_path / style)["test"]["t2i_R@1"]
        assert summary["config"].get("caption_style") == (None if style == "precise" else style)
        raw = json.loads((tmp_path / style / "synth.json").read_text())["config"]
        assert ("caption_style" in raw) == (style != "precise")  # a precise set's files are unchanged
    assert ceilings["precise"] > ceilings["partial"] and ceilings["precise"] > ceilings["ambiguous"]


def test_fingerprint_leaves_out_the_default_style_and_bad_styles_fail():
    assert synthetic.fingerprint_params({"seed": 0, "caption_style": "precise"}) == {"seed": 0}
    assert synthetic.fingerprint_params({"seed": 0, "caption_style": "partial"}) == {"seed": 0,
                                                                                     "caption_style": "partial"}
    with pytest.raises(ValueError, match="caption_style must be one of precise, partial, ambiguous"):
        synthetic.generate("/nonexistent/x", caption_style="vague", progress=False)
    with pytest.raises(ConfigError, match="data.synth.caption_style: expected one of"):
        load_config(None, ["data.synth.caption_style=vague"])
    assert load_config(None, ["data.synth.caption_style=ambiguous"]).data.synth.caption_style == "ambiguous"
