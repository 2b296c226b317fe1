"""Generated scenes of coloured shapes and questions about them, with answers that are known exactly.

A scene is 1 to 6 objects (:data:`COLOURS` x :data:`SHAPES`, varied sizes, a few degrees of rotation for
triangles and stars) on a smoothly varying, noisy, low-saturation background. Objects never overlap: their
bounding boxes are kept apart by a small gap, and inside the image. Shapes are rasterized with numpy (no
Pillow drawing), so a seed gives the same pixels on every machine; :class:`Obj` keeps each object's mask
and bounding box, and :func:`patch_labels` turns them into per-patch labels for auxiliary losses.

Questions (:data:`KINDS`), each generated only when its answer is unambiguous for the scene:

``colour``    "What colour is the square?" (the shape occurs once)               -> a colour word
``shape``     "What shape is the red object?" (the colour occurs once)           -> a shape word
``count``     "How many objects / circles / red objects are there?"              -> a digit, "0" to "6"
``exists``    "Is there a blue triangle?"                                        -> "yes" / "no"
``position``  "Where is the green circle?" (colour+shape unique, clear of the midlines)
              -> "top left", "top right", "bottom left", "bottom right"
``relative``  "Is the red square left or right of the blue circle?", "Is the red square above or below
              the blue circle?" (both named objects unique, their boxes apart along that axis)
              -> "left" / "right" / "above" / "below"

Positions are the four quadrants only (no "center", no "top"): no answer is then a prefix of another,
which :func:`is_correct` relies on. Answers are canonical: :func:`normalize_answer` of an answer is
itself.

:func:`toy_set` draws ``n`` samples, one question per freshly drawn scene, kinds round-robin in
:data:`KINDS` order, ``yes``/``no`` alternating within ``exists`` and "left"/"above" with
"right"/"below" within ``relative`` (so those kinds are balanced exactly; ``count`` alternates "how
many objects" with "how many circles / red objects"). Everything comes from one
``np.random.default_rng(seed)``: no global random state, no ``hash()``, no set iteration order.
:func:`write_jsonl` writes a set in the calibration format of ``rlens rank`` plus ``"kind"`` (and the
objects), which ``rlens eval`` reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

KINDS = ("colour", "shape", "count", "exists", "position", "relative")

# Fill colours, saturated so that the low-saturation background never looks like one of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 215, 35),
    "purple": (135, 50, 185),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
# A relative question names the axis and asks for the side, as GQA's "choose" questions do ("Is the
# X to the left or to the right of the Y?", Hudson & Manning 2019). The yes/no form ("Is the X left
# of the Y?") asks the decoder to compare the two positions *and* match the result against the
# relation word; the shipped 8-layer decoder learned the comparison (a probe read the signs off its
# residual) but answered that form at chance through every recipe tried, so the set asks the part that
# is about seeing. BEFORE are the answers where the first object comes first along the axis.
CHOICES = {
    "left of": "left or right of",
    "right of": "left or right of",
    "above": "above or below",
    "below": "above or below",
}
SIDES = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
BEFORE = ("left", "above")

MAX_OBJECTS = 6
# Object half-extent (circle radius) as a fraction of the image side.
MIN_RADIUS, MAX_RADIUS = 0.05, 0.12
# Bounding boxes of two objects stay at least this far apart (fraction of the side), and this far
# from the image border.
GAP = 0.015
# "Where is X?" is asked only when the centre of X's box is at least this far from both midlines.
POSITION_MARGIN = 0.08
COLOUR_JITTER = 14  # per-channel jitter of an object's fill
PIXEL_NOISE = 6.0  # std of the per-pixel noise over the whole image


@dataclass
class Obj:
    """One object of a scene. ``bbox`` is ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive: the
    tight box of ``mask`` (bool, image-sized)."""

    colour: str
    shape: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_json(self) -> dict[str, object]:
        return {"colour": self.colour, "shape": self.shape, "bbox": list(self.bbox)}


@dataclass
class Scene:
    objects: list[Obj]
    image: Image.Image

    @property
    def size(self) -> int:
        return self.image.width


@dataclass
class Sample:
    """One question about one image. ``scene`` (when known) has the objects the answer comes from."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: Scene | None = field(default=None, repr=False, compare=False)


# -- drawing -----------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A (size, size) field in [-1, 1]: a random (cells, cells) grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells))
    t = (np.arange(size) + 0.5) / size * (cells - 1)
    i0 = np.clip(np.floor(t).astype(np.int64), 0, cells - 2)
    f = t - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (size, cells)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation texture: a grey level with a slight tint, two octaves of smooth noise."""
    base = rng.uniform(70.0, 180.0) + rng.uniform(-15.0, 15.0, 3)
    texture = 28.0 * _smooth_noise(rng, size, 5) + 12.0 * _smooth_noise(rng, size, 17)
    return base[None, None, :] + texture[:, :, None]


def _polygon_mask(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres (xs, ys) against a closed polygon."""
    inside = np.zeros(xs.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if y1 == y2:
            continue
        crosses = (y1 > ys) != (y2 > ys)
        x_at = (x2 - x1) * (ys - y1) / (y2 - y1) + x1
        inside ^= crosses & (xs < x_at)
    return inside


def _shape_mask(
    shape: str, cx: float, cy: float, r: float, angle: float, size: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The (size, size) mask of a shape of half-extent ``r`` centred at (cx, cy), and its tight box."""
    x0, y0 = max(int(np.floor(cx - r)) - 1, 0), max(int(np.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(np.ceil(cx + r)) + 2, size), min(int(np.ceil(cy + r)) + 2, size)
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        local = dx * dx + dy * dy <= r * r
    elif shape == "square":
        side = 0.86 * r  # same area as the circle, roughly
        local = (np.abs(dx) <= side) & (np.abs(dy) <= side)
    elif shape == "cross":
        arm = 0.32 * r
        local = ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    else:
        points = 3 if shape == "triangle" else 10
        theta = angle - np.pi / 2 + 2 * np.pi * np.arange(points) / points
        radius = np.full(points, r)
        if shape == "star":
            radius[1::2] = 0.45 * r
        vertices = np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)
        local = _polygon_mask(xs, ys, vertices)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0:y1, x0:x1] = local
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def make_scene(rng: np.random.Generator, size: int = 224) -> Scene:
    """Draw 1 to 6 non-overlapping objects on a textured background (fewer if they do not fit)."""
    if size < 32:
        raise ValueError(f"image size must be at least 32, got {size}")
    pixels = _background(rng, size)
    gap = GAP * size
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    objects: list[Obj] = []
    for _ in range(wanted):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        for _attempt in range(60):
            r = rng.uniform(MIN_RADIUS, MAX_RADIUS) * size
            lo, hi = r + gap, size - r - gap
            cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
            angle = rng.uniform(-0.35, 0.35) if shape in ("triangle", "star") else 0.0
            mask, bbox = _shape_mask(shape, cx, cy, r, angle, size)
            inside = bbox[0] >= gap and bbox[1] >= gap and bbox[2] <= size - gap and bbox[3] <= size - gap
            if inside and all(_apart(bbox, o.bbox, gap) for o in objects):
                fill = np.array(COLOURS[colour], dtype=np.float64) + rng.uniform(
                    -COLOUR_JITTER, COLOUR_JITTER, 3
                )
                pixels[mask] = fill
                objects.append(Obj(colour, shape, bbox, mask))
                break
    pixels = pixels + rng.normal(0.0, PIXEL_NOISE, pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return Scene(objects, image)


def patch_labels(scene: Scene, grid: int, min_cover: float = 0.25) -> np.ndarray:
    """A (grid, grid) int array: per patch, the index of the object covering most of it (at least
    ``min_cover`` of the patch), else -1. Patch edges are ``round(i * size / grid)``."""
    edges = np.rint(np.linspace(0, scene.size, grid + 1)).astype(np.int64)
    labels = np.full((grid, grid), -1, dtype=np.int64)
    if not scene.objects:
        return labels
    masks = np.stack([o.mask for o in scene.objects]).astype(np.float64)
    for i in range(grid):
        for j in range(grid):
            cover = masks[:, edges[i] : edges[i + 1], edges[j] : edges[j + 1]].mean(axis=(1, 2))
            best = int(np.argmax(cover))
            if cover[best] >= min_cover:
                labels[i, j] = best
    return labels


# -- questions ---------------------------------------------------------------------------------


def position_of(obj: Obj, size: int) -> str | None:
    """The quadrant of ``obj``'s box centre, or None when it is within the margin of a midline."""
    cx, cy = obj.center
    half, margin = size / 2, POSITION_MARGIN * size
    if abs(cx - half) < margin or abs(cy - half) < margin:
        return None
    return f"{'top' if cy < half else 'bottom'} {'left' if cx < half else 'right'}"


def relation_holds(a: Obj, b: Obj, relation: str, gap: float = 0.0) -> bool:
    """Whether ``a`` is ``relation`` ``b`` with their boxes apart along that axis (image y grows down)."""
    if relation == "left of":
        return a.bbox[2] + gap <= b.bbox[0]
    if relation == "right of":
        return b.bbox[2] + gap <= a.bbox[0]
    if relation == "above":
        return a.bbox[3] + gap <= b.bbox[1]
    if relation == "below":
        return b.bbox[3] + gap <= a.bbox[1]
    raise ValueError(f"unknown relation {relation!r}")


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def questions_for(scene: Scene, rng: np.random.Generator) -> list[Sample]:
    """Every unambiguous question about ``scene`` (for ``exists``, as many "no" as "yes" questions;
    ``relative`` asks about every ordered pair apart along an axis, so each "left" has its "right").
    Phrasing varies with ``rng``."""
    objs, size, image = scene.objects, scene.size, scene.image
    out: list[Sample] = []

    def add(question: str, answer: str, kind: str) -> None:
        out.append(Sample(image, question, answer, kind, scene))

    colours = [o.colour for o in objs]
    shapes = [o.shape for o in objs]
    names = [o.name for o in objs]
    for shape in SHAPES:
        if shapes.count(shape) == 1:
            obj = objs[shapes.index(shape)]
            template = _pick(rng, ["What colour is the {}?", "What is the colour of the {}?"])
            add(template.format(shape), obj.colour, "colour")
    for colour in COLOURS:
        if colours.count(colour) == 1:
            obj = objs[colours.index(colour)]
            template = _pick(rng, ["What shape is the {} object?", "Which shape is {}?"])
            add(template.format(colour), obj.shape, "shape")

    if objs:
        question = _pick(rng, ["How many objects are there?", "How many shapes are there?"])
        add(question, str(len(objs)), "count")
    for shape in SHAPES:
        if shape in shapes or shape == _pick(rng, list(SHAPES)):
            add(f"How many {PLURALS[shape]} are there?", str(shapes.count(shape)), "count")
    for colour in COLOURS:
        if colour in colours or colour == _pick(rng, list(COLOURS)):
            add(f"How many {colour} objects are there?", str(colours.count(colour)), "count")

    present = [n for n in dict.fromkeys(names)]
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    chosen = rng.permutation(len(absent))[: len(present)]
    for name, answer in [(n, "yes") for n in present] + [(absent[i], "no") for i in sorted(chosen)]:
        add(f"Is there {'an' if name[0] in 'aeiou' else 'a'} {name}?", answer, "exists")

    unique = [o for o in objs if names.count(o.name) == 1]
    for obj in unique:
        where = position_of(obj, size)
        if where is not None:
            template = _pick(rng, ["Where is the {}?", "In which part of the image is the {}?"])
            add(template.format(obj.name), where, "position")

    gap = 0.02 * size
    for a in unique:
        for b in unique:
            if a is b:
                continue
            for relation in RELATIONS:
                if relation_holds(a, b, relation, gap):
                    add(f"Is the {a.name} {CHOICES[relation]} the {b.name}?", SIDES[relation], "relative")
    return out


def _counts_all(question: str) -> bool:
    return question in ("How many objects are there?", "How many shapes are there?")


def options_for(questions: list[Sample], kind: str, even: bool) -> list[Sample]:
    """The questions of ``kind`` that :func:`toy_set` may pick for its ``even``-th or odd slot of that
    kind: "yes" answers on even slots and "no" on odd ones for ``exists``, "left"/"above" on even slots
    and "right"/"below" on odd ones for ``relative``, "how many objects" on even slots and "how many
    circles / red objects" on odd ones for ``count``."""
    options = [s for s in questions if s.kind == kind]
    if kind == "exists":
        return [s for s in options if s.answer == ("yes" if even else "no")]
    if kind == "relative":
        return [s for s in options if (s.answer in BEFORE) == even]
    if kind == "count":
        return [s for s in options if _counts_all(s.question) == even]
    return options


def toy_set(n: int, seed: int, size: int = 224) -> list[Sample]:
    """``n`` samples, one per scene, kinds round-robin in :data:`KINDS` order; ``exists`` alternates "yes"
    and "no", ``relative`` "left"/"above" and "right"/"below", and ``count`` alternates counting all
    objects and counting one shape or colour (which is mostly 0, 1 or 2). The same (n, seed, size) gives
    the same samples, pixel for pixel."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    samples: list[Sample] = []
    seen = dict.fromkeys(KINDS, 0)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        even = seen[kind] % 2 == 0
        for _attempt in range(1000):
            scene = make_scene(rng, size)
            options = options_for(questions_for(scene, rng), kind, even)
            if options:
                samples.append(options[int(rng.integers(len(options)))])
                break
        else:  # pragma: no cover - each kind has a question in a good share of scenes
            raise RuntimeError(f"no {kind} question in 1000 scenes")
        seen[kind] += 1
    return samples


def write_jsonl(samples: list[Sample], out_path: str | Path) -> Path:
    """Write ``samples`` as JSON lines, images as ``images/000000.png`` ... beside the file.

    Lines: ``{"image": "images/000000.png", "prompt": question, "answer": answer, "kind": kind,
    "objects": [{"colour", "shape", "bbox"}, ...]}`` (``objects`` only when the scene is known). Image
    paths are relative to the file's directory, as ``rlens rank`` and ``rlens eval`` resolve them.
    """
    out_path = Path(out_path)
    image_dir = out_path.parent / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(samples):
        relative = f"images/{i:06d}.png"
        sample.image.save(out_path.parent / relative, format="PNG")
        record: dict[str, object] = {
            "image": relative,
            "prompt": sample.question,
            "answer": sample.answer,
            "kind": sample.kind,
        }
        if sample.scene is not None:
            record["objects"] = [o.to_json() for o in sample.scene.objects]
        lines.append(json.dumps(record))
    out_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out_path


# -- scoring -----------------------------------------------------------------------------------

NUMBER_WORDS = {
    "zero": "0",
    "none": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
SPELLINGS = {"color": "colour", "colors": "colours", "gray": "grey"}
ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lowercase; punctuation becomes spaces ("top-left." -> "top left"); drop "a", "an", "the";
    number words become digits ("three" -> "3", "none" -> "0"); "color" -> "colour"; single spaces."""
    words = re.sub(r"[^\w\s]|_", " ", text.lower()).split()
    words = [SPELLINGS.get(w, NUMBER_WORDS.get(w, w)) for w in words]
    return " ".join(w for w in words if w not in ARTICLES)


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match after :func:`normalize_answer`, where a prediction also counts if it *starts* with the
    answer followed by a word boundary: "Red." and "red circle" are right for "red", "reddish" is not,
    "yes, it is" is right for "yes", "12" is wrong for "1". Toy answers are never a prefix of each
    other, so a longer prediction cannot be right for two different answers."""
    p, a = normalize_answer(prediction), normalize_answer(answer)
    return p == a or (bool(a) and p.startswith(a + " "))
