"""Deterministic synthetic image-text retrieval dataset of coloured shapes on a 3x3 grid.

`generate` writes, under one folder: a Karpathy split file (`dataset_synthetic.json`), JPEG images
(`images/`), NUS-WIDE-style label files (`Concepts81.txt`, `ImageList/`, `Groundtruth/AllLabels/`,
`NUS_WID_Tags/`), the objects' boxes in the COCO instances format (`annotations/instances.json`: one
category per shape, the tight box of each drawn object), the retrieval ceiling (`ceiling.json`) and a
summary (`synth.json`, written last).

Each scene has 1..max_objects objects (shape, colour, size, grid cell; no two share shape and colour).
Each image has 5 distinct captions in one of three styles (`caption_style`, the robustness experiment of
the SCL paper, seed 003, section 5): `precise` (the default: every object described), `partial` (incomplete
fragments naming some objects by one or two attributes) or `ambiguous` (vague text: counts, unbound colours
or shapes). Each caption keeps its meaning as a `CaptionMeaning`, which the ceiling (best R@1 a perfect model
could reach) is computed from. The style changes the captions only: scenes and images are the same.
Everything is drawn from `numpy.random.default_rng` seeded by (seed, image index), so a given seed
and sizes give byte-identical files whatever the generation order.
"""
from __future__ import annotations

import json
import numbers
import re
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.config import CAPTION_STYLES
from pipeline.data.instances import attach_boxes, read_coco_instances
from pipeline.data.karpathy import read_karpathy
from pipeline.data.sample import Rejected, Sample
from pipeline.data.sources.nuswide import read_concept_labels
from pipeline.io import atomic_dir

CODE_VERSION = 2  # 2: annotations/instances.json (object boxes)

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
CONCEPTS = SHAPES + COLOURS
ATTRIBUTE_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
CAPTIONS_PER_IMAGE = 5

COLOUR_RGB = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "cyan": (40, 210, 220), "white": (240, 240, 240),
}
SIZE_RADIUS = {"small": 0.26, "large": 0.42}  # object radius as a fraction of the grid cell
JITTER = 0.5  # fraction of the free space between an object and its cell border used for jitter
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

KARPATHY_FILE = "dataset_synthetic.json"
INSTANCES_FILE = "annotations/instances.json"
IMAGE_DIR = "images"
SPLITS = ("train", "val", "test")
CEILING_SPLITS = ("test", "val")
PREVIEW_IMAGES = 8  # test images drawn with a caption into preview.png


# ----------------------------------------------------------------------------- scenes and meanings


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; `jitter_x/y` in [-1, 1] shift it inside its grid cell."""

    shape: str
    colour: str
    size: str
    position: str  # one of POSITIONS
    jitter_x: float = 0.0
    jitter_y: float = 0.0


@dataclass(frozen=True)
class Scene:
    """The objects of one image, in drawing order."""

    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class ObjectMention:
    """What a caption says about one object; None = attribute not mentioned."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def attributes(self) -> dict[str, str]:
        """Returns {attribute name: value} of the mentioned attributes."""
        values = {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class Relation:
    """Mentioned object `subject` is `relation` (one of RELATIONS) mentioned object `reference`."""

    subject: int
    relation: str
    reference: int


@dataclass(frozen=True)
class CaptionMeaning:
    """Structured content of a caption: one mention per described object, and at most one relation.
    `complete`: the caption describes every object of its scene (so it also says how many there are); an
    incomplete one (`partial` and most `ambiguous` captions) fits any scene with at least that many objects."""

    objects: tuple[ObjectMention, ...]
    relation: Relation | None = None
    complete: bool = True


@dataclass(frozen=True)
class Caption:
    text: str
    meaning: CaptionMeaning


def relation_holds(relation: str, subject: SceneObject, reference: SceneObject) -> bool:
    """True when `subject` is `relation` `reference` judging by their grid rows and columns."""
    subject_row, subject_col = divmod(POSITIONS.index(subject.position), 3)
    reference_row, reference_col = divmod(POSITIONS.index(reference.position), 3)
    return {
        "left of": subject_col < reference_col,
        "right of": subject_col > reference_col,
        "above": subject_row < reference_row,
        "below": subject_row > reference_row,
    }[relation]


def is_consistent(meaning: CaptionMeaning, scene: Scene) -> bool:
    """True when the scene has as many objects as the caption describes (at least as many, for an incomplete
    caption) and some one-to-one assignment of mentions to objects satisfies every mentioned attribute and the
    relation."""
    objects = scene.objects
    if len(meaning.objects) > len(objects) or (meaning.complete and len(meaning.objects) != len(objects)):
        return False
    candidates = [
        [j for j, obj in enumerate(objects) if all(getattr(obj, k) == v for k, v in mention.attributes().items())]
        for mention in meaning.objects
    ]
    assignment: list[int] = []

    def extend() -> bool:
        if len(assignment) == len(candidates):
            rel = meaning.relation
            return rel is None or relation_holds(
                rel.relation, objects[assignment[rel.subject]], objects[assignment[rel.reference]]
            )
        for j in candidates[len(assignment)]:
            if j not in assignment:
                assignment.append(j)
                if extend():
                    return True
                assignment.pop()
        return False

    return extend()


# ----------------------------------------------------------------------------- sampling and drawing


def sample_scene(rng: np.random.Generator, max_objects: int) -> Scene:
    """Returns a scene of 1..max_objects objects in distinct cells with distinct (shape, colour) pairs."""
    count = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    kinds = rng.choice(len(SHAPES) * len(COLOURS), size=count, replace=False)
    sizes = rng.integers(0, len(SIZES), size=count)
    jitters = rng.uniform(-1.0, 1.0, size=(count, 2))
    return Scene(tuple(
        SceneObject(
            shape=SHAPES[kind // len(COLOURS)], colour=COLOURS[kind % len(COLOURS)], size=SIZES[size],
            position=POSITIONS[cell], jitter_x=float(jx), jitter_y=float(jy),
        )
        for cell, kind, size, (jx, jy) in zip(cells, kinds, sizes, jitters)
    ))


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Returns an RGB image of `image_size` x `image_size` px: a noisy dark background with the objects."""
    noise = rng.standard_normal(size=(image_size, image_size, 3), dtype=np.float32)
    background = rng.integers(8, 40, size=3).astype(np.float32) + 5.0 * noise
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, *object_placement(obj, image_size), COLOUR_RGB[obj.colour])
    return image


def object_placement(obj: SceneObject, image_size: int) -> tuple[float, float, float]:
    """Returns (x, y, r): the centre and radius in pixels at which `obj` is drawn in an image_size image."""
    cell = image_size / 3
    row, col = divmod(POSITIONS.index(obj.position), 3)
    radius = SIZE_RADIUS[obj.size] * cell
    slack = (cell / 2 - radius) * JITTER
    return (col + 0.5) * cell + obj.jitter_x * slack, (row + 0.5) * cell + obj.jitter_y * slack, radius


def object_box(obj: SceneObject, image_size: int) -> list[float]:
    """Returns the tight [x0, y0, x1, y1] pixel box of `obj` as `render_scene` draws it: its pixels are the
    columns x0 .. x1 - 1 and the rows y0 .. y1 - 1."""
    mask = Image.new("1", (image_size, image_size))
    _draw_shape(ImageDraw.Draw(mask), obj.shape, *object_placement(obj, image_size), 1)
    return [float(v) for v in mask.getbbox()]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, fill: tuple | int) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        half = 0.85 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + 0.95 * r, y + 0.8 * r), (x - 0.95 * r, y + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    elif shape == "cross":
        arm = 0.35 * r
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def save_image(image: Image.Image, path: Path) -> None:
    """Writes `image` as a quality-90 JPEG."""
    image.save(path, format="JPEG", quality=90)


# ----------------------------------------------------------------------------- captions


def _mention(obj: SceneObject, *, shape=False, colour=False, size=False, position=False) -> ObjectMention:
    return ObjectMention(
        shape=obj.shape if shape else None, colour=obj.colour if colour else None,
        size=obj.size if size else None, position=obj.position if position else None,
    )


def _phrase(mention: ObjectMention, rng: np.random.Generator, definite: bool = False) -> str:
    """Noun phrase for a mention, e.g. 'a big red circle in the top left' or 'the blue shape'."""
    words = []
    if mention.size:
        synonyms = SIZE_WORDS[mention.size]
        words.append(synonyms[int(rng.integers(len(synonyms)))])
    if mention.colour:
        words.append(mention.colour)
    words.append(mention.shape or "shape")
    article = "the" if definite else ("an" if words[0][0] in "aeiou" else "a")
    phrase = " ".join([article, *words])
    return f"{phrase} {POSITION_PHRASES[mention.position]}" if mention.position else phrase


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def _caption_listing(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'a large red circle and a small blue square'"""
    mentions = [_mention(o, shape=True, colour=True, size=True) for o in objects]
    return Caption(_join([_phrase(m, rng) for m in mentions]), CaptionMeaning(tuple(mentions)))


def _caption_counted(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'two shapes: a blue square and a red circle'"""
    mentions = [_mention(o, shape=True, colour=True) for o in objects]
    noun = "shape" if len(objects) == 1 else "shapes"
    text = f"{NUMBER_WORDS[len(objects)]} {noun}: {_join([_phrase(m, rng) for m in mentions])}"
    return Caption(text, CaptionMeaning(tuple(mentions)))


def _caption_located(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'a small blue square in the bottom right and a big red circle on the left'"""
    mentions = [_mention(o, shape=True, colour=True, size=True, position=True) for o in objects]
    return Caption(_join([_phrase(m, rng) for m in mentions]), CaptionMeaning(tuple(mentions)))


def _caption_image_with(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'an image with a small square at the top and a large circle on the left' (no colours)"""
    mentions = [_mention(o, shape=True, size=True, position=True) for o in objects]
    return Caption(f"an image with {_join([_phrase(m, rng) for m in mentions])}", CaptionMeaning(tuple(mentions)))


def _caption_dark_background(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'a dark background with a blue shape in the bottom right and a red shape on the left' (no shapes)"""
    mentions = [_mention(o, colour=True, position=True) for o in objects]
    text = f"a dark background with {_join([_phrase(m, rng) for m in mentions])}"
    return Caption(text, CaptionMeaning(tuple(mentions)))


def _true_relation(subject: SceneObject, reference: SceneObject, rng: np.random.Generator) -> str:
    holding = [rel for rel in RELATIONS if relation_holds(rel, subject, reference)]
    return holding[int(rng.integers(len(holding)))]


def _caption_relation_phrase(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'a large red circle to the left of a small blue square, with a green triangle'"""
    mentions = [_mention(o, shape=True, colour=True, size=i < 2) for i, o in enumerate(objects)]
    relation = _true_relation(objects[0], objects[1], rng)
    text = f"{_phrase(mentions[0], rng)} {RELATION_PHRASES[relation]} {_phrase(mentions[1], rng)}"
    if len(mentions) > 2:
        text += f", with {_join([_phrase(m, rng) for m in mentions[2:]])}"
    return Caption(text, CaptionMeaning(tuple(mentions), Relation(0, relation, 1)))


def _caption_relation_sentence(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """'the red circle is above the blue square, and there is also a green triangle'"""
    mentions = [_mention(o, shape=True, colour=True) for o in objects]
    relation = _true_relation(objects[0], objects[1], rng)
    text = (f"{_phrase(mentions[0], rng, definite=True)} is {RELATION_PHRASES[relation]} "
            f"{_phrase(mentions[1], rng, definite=True)}")
    if len(mentions) > 2:
        text += f", and there is also {_join([_phrase(m, rng) for m in mentions[2:]])}"
    return Caption(text, CaptionMeaning(tuple(mentions), Relation(0, relation, 1)))


CaptionTemplate = Callable[[Sequence[SceneObject], np.random.Generator], Caption]
PLAIN_TEMPLATES: tuple[CaptionTemplate, ...] = (
    _caption_listing, _caption_counted, _caption_located, _caption_image_with, _caption_dark_background,
)
RELATION_TEMPLATES: tuple[CaptionTemplate, ...] = (_caption_relation_phrase, _caption_relation_sentence)


def write_captions(scene: Scene, rng: np.random.Generator, style: str = "precise") -> list[Caption]:
    """Returns 5 captions of `style` (one of CAPTION_STYLES). `precise`: distinct templates, each mentioning
    every object (in a random order); one-object scenes use the 5 plain templates, larger ones 4 of them plus
    one relation template. `partial` and `ambiguous`: see `partial_caption` and `ambiguous_caption`."""
    if style != "precise":
        return _distinct_captions(scene, rng, {"partial": partial_caption, "ambiguous": ambiguous_caption}[style])
    templates = list(PLAIN_TEMPLATES)
    if len(scene.objects) > 1:
        del templates[int(rng.integers(len(templates)))]
        templates.append(RELATION_TEMPLATES[int(rng.integers(len(RELATION_TEMPLATES)))])
    captions = []
    for t in rng.permutation(len(templates)):
        objects = [scene.objects[j] for j in rng.permutation(len(scene.objects))]
        captions.append(templates[t](objects, rng))
    return captions


MAX_CAPTION_DRAWS = 50  # draws per image to find 5 distinct partial / ambiguous captions (then repeats are kept)
PARTIAL_ATTRIBUTES = ("shape", "colour", "size", "position")
SEVERAL = 3  # "several shapes": at least this many


def _fragment(mention: ObjectMention, rng: np.random.Generator) -> str:
    """An article-less noun phrase of a mention, e.g. 'big red shape' or 'circle in the top left'."""
    return _phrase(mention, rng).split(" ", 1)[1]


def partial_caption(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """An incomplete sentence: 1..n of the objects, each by one or two of its attributes, as fragments cut off
    with '...', e.g. 'red shape, circle on the left ...'. Incomplete: it does not say how many objects there
    are."""
    count = int(rng.integers(1, len(objects) + 1))
    mentions = []
    for j in rng.permutation(len(objects))[:count]:
        keep = rng.permutation(len(PARTIAL_ATTRIBUTES))[:int(rng.integers(1, 3))]
        mentions.append(_mention(objects[j], **{PARTIAL_ATTRIBUTES[a]: True for a in keep}))
    return Caption(", ".join(_fragment(m, rng) for m in mentions) + " ...",
                   CaptionMeaning(tuple(mentions), complete=False))


def ambiguous_caption(objects: Sequence[SceneObject], rng: np.random.Generator) -> Caption:
    """Vague text: how many shapes there are, or one or two colours or shapes bound to no other attribute, e.g.
    'a couple of shapes', 'something purple', 'red and blue things', 'a circle somewhere'."""
    n = len(objects)
    options = ["count", "colour", "shape", "anything"] + (["colours"] if n > 1 else [])
    kind = options[int(rng.integers(len(options)))]
    pick = objects[int(rng.integers(n))]
    if kind == "count":
        shown = min(n, SEVERAL)
        text = {1: "a single shape", 2: "a couple of shapes"}.get(n, "several shapes")
        return Caption(text, CaptionMeaning((ObjectMention(),) * shown, complete=n < SEVERAL))
    if kind == "colour":
        article = "an" if pick.colour[0] in "aeiou" else "a"
        wording = ("something {}", article + " {} thing", "some {} in the picture")[int(rng.integers(3))]
        text = wording.format(pick.colour)
        return Caption(text, CaptionMeaning((ObjectMention(colour=pick.colour),), complete=False))
    if kind == "shape":
        text = ("a {} somewhere", "something like a {}")[int(rng.integers(2))].format(pick.shape)
        return Caption(text, CaptionMeaning((ObjectMention(shape=pick.shape),), complete=False))
    if kind == "colours":
        a, b = (objects[j] for j in rng.permutation(n)[:2])
        return Caption(f"{a.colour} and {b.colour} things", CaptionMeaning(
            (ObjectMention(colour=a.colour), ObjectMention(colour=b.colour)), complete=False))
    return Caption("coloured shapes on a dark background", CaptionMeaning((ObjectMention(),), complete=False))


def _distinct_captions(scene: Scene, rng: np.random.Generator, draw: CaptionTemplate) -> list[Caption]:
    """Returns CAPTIONS_PER_IMAGE captions drawn by `draw`, distinct texts while MAX_CAPTION_DRAWS allow (a
    scene with few distinct vague captions keeps repeats)."""
    captions: list[Caption] = []
    for _ in range(MAX_CAPTION_DRAWS):
        caption = draw(scene.objects, rng)
        if caption.text not in {c.text for c in captions}:
            captions.append(caption)
        if len(captions) == CAPTIONS_PER_IMAGE:
            return captions
    while len(captions) < CAPTIONS_PER_IMAGE:
        captions.append(draw(scene.objects, rng))
    return captions


def tokenize(text: str) -> list[str]:
    """Returns the lowercase words of `text` (punctuation dropped)."""
    return re.findall(r"[a-z]+", text.lower())


def concepts_of(scene: Scene) -> list[str]:
    """Returns the scene's shape and colour names, in CONCEPTS order."""
    present = {o.shape for o in scene.objects} | {o.colour for o in scene.objects}
    return [c for c in CONCEPTS if c in present]


def make_image(seed: int, index: int, image_size: int, max_objects: int,
               caption_style: str = "precise") -> tuple[Scene, list[Caption], Image.Image]:
    """Returns the (scene, 5 captions of `caption_style`, image) of image `index`; scene and captions do not
    depend on image_size, nor scene and image on the caption style (separate random streams; the captions are
    drawn after the scene)."""
    scene_seed, render_seed = np.random.SeedSequence([seed, index]).spawn(2)
    scene_rng = np.random.default_rng(scene_seed)
    scene = sample_scene(scene_rng, max_objects)
    captions = write_captions(scene, scene_rng, caption_style)
    return scene, captions, render_scene(scene, image_size, np.random.default_rng(render_seed))


# ----------------------------------------------------------------------------- ceiling


@dataclass
class _ScenesWithCount:
    """Scenes of one object count as attribute code arrays, for a vectorised first filter."""

    image_ids: np.ndarray  # [N] indices into the split's scene list
    codes: dict[str, np.ndarray]  # attribute -> [N, object count] index into its value tuple



def _group_by_count(scenes: Sequence[Scene]) -> dict[int, _ScenesWithCount]:
    ids_by_count: dict[int, list[int]] = defaultdict(list)
    for i, scene in enumerate(scenes):
        ids_by_count[len(scene.objects)].append(i)
    groups = {}
    for count, ids in ids_by_count.items():
        codes = {
            attr: np.array([[values.index(getattr(o, attr)) for o in scenes[i].objects] for i in ids])
            for attr, values in ATTRIBUTE_VALUES.items()
        }
        groups[count] = _ScenesWithCount(np.array(ids), codes)
    return groups


def _consistent_images(meaning: CaptionMeaning, groups: dict[int, _ScenesWithCount],
                       scenes: Sequence[Scene]) -> frozenset[int]:
    """Returns the indices of the scenes consistent with `meaning` (of its object count, or of any count at
    least as large for an incomplete caption)."""
    mentioned = len(meaning.objects)
    counts = [mentioned] if meaning.complete else [c for c in groups if c >= mentioned]
    found: set[int] = set()
    for count in counts:
        group = groups.get(count)
        if group is None:
            continue
        fits = np.ones((len(group.image_ids), mentioned, count), dtype=bool)
        for i, mention in enumerate(meaning.objects):  # fits[scene, mention, object]
            for attr, value in mention.attributes().items():
                fits[:, i] &= group.codes[attr] == ATTRIBUTE_VALUES[attr].index(value)
        plausible = fits.any(axis=2).all(axis=1)
        if meaning.complete:
            plausible &= fits.any(axis=1).all(axis=1)
        found.update(int(i) for i in group.image_ids[plausible] if is_consistent(meaning, scenes[i]))
    return frozenset(found)


def retrieval_ceiling(scenes: Sequence[Scene], meanings: Sequence[Sequence[CaptionMeaning]]) -> dict[str, float]:
    """Returns {"t2i_R@1", "i2t_R@1"} in percent: the expected R@1 of a perfect model that ranks
    the items consistent with the query first, in random order. `meanings[i]` = captions of scene i.

    t2i = mean over captions of [own image consistent] / |consistent images|;
    i2t = mean over images of min(1, own consistent captions / |consistent captions|).
    """
    groups = _group_by_count(scenes)
    cache: dict[CaptionMeaning, frozenset[int]] = {}
    t2i_hits: list[float] = []
    consistent_captions = np.zeros(len(scenes))
    own_consistent = np.zeros(len(scenes))
    for image_id, image_meanings in enumerate(meanings):
        for meaning in image_meanings:
            if meaning not in cache:
                cache[meaning] = _consistent_images(meaning, groups, scenes)
            matches = cache[meaning]
            own = image_id in matches
            t2i_hits.append(1 / len(matches) if own else 0.0)
            own_consistent[image_id] += own
            consistent_captions[list(matches)] += 1
    i2t_hits = np.minimum(1.0, own_consistent / np.maximum(consistent_captions, 1))
    return {"t2i_R@1": 100.0 * float(np.mean(t2i_hits)), "i2t_R@1": 100.0 * float(np.mean(i2t_hits))}


# ----------------------------------------------------------------------------- writing

ARGUMENT_RANGES = {  # name -> (lowest, highest or None) allowed value
    "seed": (0, None), "num_train": (0, None), "num_val": (0, None), "num_test": (1, None),
    "image_size": (32, None), "max_objects": (1, 9),
}


def _validate(config: dict) -> None:
    if config.get("caption_style", "precise") not in CAPTION_STYLES:
        raise ValueError(f"caption_style must be one of {', '.join(CAPTION_STYLES)}, got {config['caption_style']!r}")
    for name, (lowest, highest) in ARGUMENT_RANGES.items():
        value = config[name]
        if not isinstance(value, numbers.Integral) or value < lowest or (highest is not None and value > highest):
            allowed = f">= {lowest}" if highest is None else f"between {lowest} and {highest}"
            raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")


def _write_json(path: Path, obj, indent: int | None = 2) -> None:
    path.write_text(json.dumps(obj, indent=indent) + "\n", encoding="utf-8")


def _write_labels(out: Path, filenames: Sequence[str], concepts: Sequence[list[str]]) -> None:
    """NUS-WIDE layout: concept list, image list, one 0/1 file per concept, tags per image."""
    (out / "Concepts81.txt").write_text("".join(f"{c}\n" for c in CONCEPTS))
    (out / "ImageList").mkdir()
    (out / "ImageList" / "Imagelist.txt").write_text("".join(f"{IMAGE_DIR}\\{name}\n" for name in filenames))
    (out / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for concept in CONCEPTS:
        flags = "".join("1\n" if concept in present else "0\n" for present in concepts)
        (out / "Groundtruth" / "AllLabels" / f"Labels_{concept}.txt").write_text(flags)
    (out / "NUS_WID_Tags").mkdir()
    (out / "NUS_WID_Tags" / "All_Tags.txt").write_text(
        "".join(f"{Path(name).stem} {' '.join(present)}\n" for name, present in zip(filenames, concepts))
    )


def _instances(filenames: Sequence[str], scenes: Sequence[Scene], image_size: int) -> dict:
    """COCO instances layout: one category per shape, one annotation per object with its tight box."""
    images, annotations = [], []
    for index, (name, scene) in enumerate(zip(filenames, scenes)):
        images.append({"id": index, "file_name": name, "width": image_size, "height": image_size})
        for obj in scene.objects:
            x0, y0, x1, y1 = object_box(obj, image_size)
            annotations.append({"id": len(annotations) + 1, "image_id": index, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "category_id": SHAPES.index(obj.shape) + 1, "iscrowd": 0})
    categories = [{"id": i + 1, "name": shape} for i, shape in enumerate(SHAPES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_preview(out: Path, filenames: Sequence[str], texts: Sequence[str], path: Path) -> None:
    """Draws a grid of images, each with one of its captions, to a PNG: what the set looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(filenames) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name, text in zip(axes.flat, filenames, texts):
        ax.imshow(Image.open(out / IMAGE_DIR / name), interpolation="nearest")
        ax.set_title(textwrap.fill(text, 40), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def fingerprint_params(params: dict) -> dict:
    """Returns the generation parameters that identify a dataset: `caption_style: precise` (the default) is left
    out, so a dataset generated before caption styles existed keeps its identity (its files are byte-identical)."""
    return {k: v for k, v in params.items() if not (k == "caption_style" and v == "precise")}


def generate(root: str | Path, *, seed: int = 0, num_train: int = 1000, num_val: int = 100, num_test: int = 500,
             image_size: int = 64, max_objects: int = 3, caption_style: str = "precise",
             progress: bool = True) -> dict:
    """Writes the dataset under `root` atomically (built in a sibling temp folder, then renamed over
    any existing `root`) and returns the summary dict written to `root/synth.json`:
    {"code_version", "config": {seed, num_train, num_val, num_test, image_size, max_objects[, caption_style]},
     "counts": {split: number of images}, "num_captions", "concepts": [concept names]}
    (`caption_style` only when it is not `precise`: a precise set is byte-identical to one generated before
    caption styles existed).

    Images are numbered globally (train, then val, then test); scenes and images do not depend on
    `caption_style`. Raises ValueError naming the argument when one is out of range.
    """
    config = fingerprint_params({"seed": seed, "num_train": num_train, "num_val": num_val, "num_test": num_test,
                                 "image_size": image_size, "max_objects": max_objects, "caption_style": caption_style})
    _validate(config)
    counts = {"train": num_train, "val": num_val, "test": num_test}
    image_splits = [split for split in SPLITS for _ in range(counts[split])]
    scenes: list[Scene] = []
    captions: list[list[Caption]] = []
    with atomic_dir(root) as out:
        (out / IMAGE_DIR).mkdir()
        for index in tqdm(range(len(image_splits)), desc="synthetic images", disable=not progress, file=sys.stderr):
            scene, image_captions, image = make_image(seed, index, image_size, max_objects, caption_style)
            save_image(image, out / IMAGE_DIR / f"synth_{index:06d}.jpg")
            scenes.append(scene)
            captions.append(image_captions)
        entries, sentid = [], 0
        for index, (split, image_captions) in enumerate(zip(image_splits, captions)):
            sentids = list(range(sentid, sentid + len(image_captions)))
            sentid += len(image_captions)
            entries.append({
                "filepath": IMAGE_DIR, "filename": f"synth_{index:06d}.jpg", "imgid": index, "split": split,
                "sentids": sentids,
                "sentences": [{"raw": c.text, "tokens": tokenize(c.text), "imgid": index, "sentid": s}
                              for c, s in zip(image_captions, sentids)],
            })
        _write_json(out / KARPATHY_FILE, {"dataset": "synthetic", "images": entries}, indent=None)  # big: compact
        filenames = [e["filename"] for e in entries]
        _write_labels(out, filenames, [concepts_of(s) for s in scenes])
        (out / INSTANCES_FILE).parent.mkdir()
        _write_json(out / INSTANCES_FILE, _instances(filenames, scenes, image_size), indent=None)
        ceiling = {}
        for split in CEILING_SPLITS:
            members = [i for i, s in enumerate(image_splits) if s == split]
            ceiling[split] = retrieval_ceiling(
                [scenes[i] for i in members], [[c.meaning for c in captions[i]] for i in members]
            ) if members else {"t2i_R@1": None, "i2t_R@1": None}
        _write_json(out / "ceiling.json", ceiling)
        shown = [i for i, split in enumerate(image_splits) if split == "test"][:PREVIEW_IMAGES]
        _write_preview(out, [entries[i]["filename"] for i in shown], [captions[i][0].text for i in shown],
                       out / "preview.png")
        summary = {"code_version": CODE_VERSION, "config": config, "counts": counts,
                   "num_captions": sentid, "concepts": list(CONCEPTS)}
        _write_json(out / "synth.json", summary)
    return summary


def read_ceiling(root: str | Path) -> dict:
    """Returns root/ceiling.json: {"test": {"t2i_R@1": float, "i2t_R@1": float}, "val": {...}} in percent
    (values None for an empty val split)."""
    return json.loads((Path(root) / "ceiling.json").read_text(encoding="utf-8"))


def load_samples(root: str | Path, name: str) -> tuple[list[Sample], list[Rejected]]:
    """Returns (one `Sample` per generated image (key `{name}-{imgid}`, image = file path) with its 5 captions,
    its concept labels and its objects' boxes, the rejected entries of the split file)."""
    root = Path(root)
    samples, rejected = read_karpathy(root / KARPATHY_FILE, root, key_prefix=name)
    labels = read_concept_labels(root)
    for sample in samples:
        sample.labels = labels[sample.meta["filename"]]
    return attach_boxes(samples, rejected, *read_coco_instances(root / INSTANCES_FILE))
