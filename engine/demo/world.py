"""The demo's synthetic world: one or two flat shapes (circle, square, triangle) of two sizes at
named positions (the cells of a 3×3 grid) on a flat background, each scene with a caption drawn
from templates and paraphrases.

Scenes are drawn from a seeded ``numpy`` generator and rendered on the fly. ``HELD_OUT`` names
(colour, shape, background) combinations that training never shows; ``held_out_scenes`` builds
the evaluation prompts from them, so every evaluated prompt is a new combination of words the
model has seen.
"""
from dataclasses import dataclass, replace

import numpy as np

SIDE = 32  # pixels; the latents are SIDE / 2 = 16 on a side

# Palette, RGB 0-255. Far apart in RGB, so the checker can classify each pixel by nearest colour.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# Diameter (bounding-box side) in pixels of each size word.
SIZES = {"small": 8, "large": 11}
# Named positions: (row, column) of a 3×3 grid cell, with the phrases that name it.
POSITIONS = {
    (0, 0): ("in the top left corner", "at the top left"),
    (0, 1): ("at the top", "in the top middle"),
    (0, 2): ("in the top right corner", "at the top right"),
    (1, 0): ("on the left", "at the left side"),
    (1, 1): ("in the center", "in the middle"),
    (1, 2): ("on the right", "at the right side"),
    (2, 0): ("in the bottom left corner", "at the bottom left"),
    (2, 1): ("at the bottom", "in the bottom middle"),
    (2, 2): ("in the bottom right corner", "at the bottom right"),
}

# (shape colour, shape, background) never rendered in training. Each word still appears in
# training in other combinations.
HELD_OUT = frozenset({
    ("red", "triangle", "blue"),
    ("blue", "circle", "yellow"),
    ("green", "square", "white"),
    ("yellow", "circle", "black"),
    ("white", "triangle", "green"),
    ("black", "square", "red"),
    ("red", "circle", "white"),
    ("green", "triangle", "black"),
    ("yellow", "square", "blue"),
})


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    size: str
    cell: tuple  # (row, column) in the 3×3 grid


@dataclass(frozen=True)
class Scene:
    shapes: tuple
    background: str
    caption: str

    def held_out(self):
        return any((s.colour, s.kind, self.background) in HELD_OUT for s in self.shapes)


def _article(words):
    return "an" if words[0] in "aeiou" else "a"


def describe(shape: Shape, rng, size_word=True, position=True):
    words = " ".join(([shape.size] if size_word else []) + [shape.colour, shape.kind])
    phrase = f"{_article(words)} {words}"
    if position:
        phrase += " " + POSITIONS[shape.cell][rng.integers(2) if rng is not None else 0]
    return phrase


def caption(shapes, background, rng=None, plain=0.0):
    """A caption from the templates; ``rng`` picks the paraphrase and whether the size and the
    position are named (None: the first paraphrase of each, naming both). A one-shape caption
    names neither with probability ``plain`` on top of the templates' own mix."""
    pick = (lambda n: 0) if rng is None else (lambda n: int(rng.integers(n)))
    bg = [f"on a {background} background", f"on {background}",
          f"with a {background} background"][pick(3)]
    if len(shapes) == 1:
        s = shapes[0]
        # A quarter of the one-shape captions name no position ("a red circle on a blue
        # background"); ``random_scene`` decides where such a shape is drawn.
        bare = plain > 0 and rng is not None and rng.random() < plain
        body = describe(s, rng, size_word=(pick(2) == 0 or rng is None) and not bare,
                        position=(pick(4) != 0 or rng is None) and not bare)
        return [f"{body} {bg}", f"{body} {bg}", f"a picture of {body} {bg}"][pick(3)]
    a, b = shapes
    return f"{describe(a, rng, False)} and {describe(b, rng, False)} {bg}"


def plain_caption(shape: Shape, background):
    """The shortest caption, naming neither size nor position: "a red circle on a blue
    background" (a quarter of the training captions name no position, half no size)."""
    return f"{describe(shape, None, size_word=False, position=False)} on a {background} background"


UNPLACED = ("anywhere", "centre")


def random_scene(rng, allow_held_out=False, plain=0.0, unplaced="anywhere") -> Scene:
    """A scene of one shape (70%) or two shapes in different cells, with its caption
    (``plain``: see ``caption``). A one-shape caption that names no position leaves its shape
    in the cell drawn (``unplaced="anywhere"``) or moves it to the centre (``"centre"``: the
    model then draws one shape where it would otherwise hedge between places)."""
    while True:
        names = list(COLOURS)
        background = names[rng.integers(len(names))]
        others = [c for c in names if c != background]
        n = 1 if rng.random() < 0.7 else 2
        cells = [tuple(int(v) for v in divmod(int(i), 3)) for i in rng.choice(9, n, replace=False)]
        colours = rng.choice(others, n, replace=False)
        shapes = tuple(Shape(str(colours[i]), SHAPES[rng.integers(3)],
                             "small" if n == 2 else list(SIZES)[rng.integers(2)], cells[i])
                       for i in range(n))
        text = caption(shapes, background, rng, plain)
        if unplaced == "centre" and n == 1 and not any(p in text for p in
                                                       POSITIONS[shapes[0].cell]):
            shapes = (replace(shapes[0], cell=(1, 1)),)
        scene = Scene(shapes, background, text)
        if allow_held_out or not scene.held_out():
            return scene


def shape_mask(kind, diameter, cy, cx, side=SIDE):
    """Boolean (side, side) mask of one shape whose bounding box, ``diameter`` pixels wide, is
    centred on (cy, cx)."""
    ys, xs = np.mgrid[0:side, 0:side] + 0.5
    half = diameter / 2
    dy, dx = ys - cy, xs - cx
    if kind == "circle":
        return dy ** 2 + dx ** 2 <= half ** 2
    if kind == "square":
        return (np.abs(dy) <= half) & (np.abs(dx) <= half)
    # Triangle pointing up: apex at the top centre, base along the bottom of the box.
    t = (dy + half) / (2 * half)  # 0 at the apex row, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)


def cell_centre(cell):
    cell_side = SIDE / 3
    return (cell[0] + 0.5) * cell_side, (cell[1] + 0.5) * cell_side


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 (SIDE, SIDE, 3)."""
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[:] = COLOURS[scene.background]
    for s in scene.shapes:
        image[shape_mask(s.kind, SIZES[s.size], *cell_centre(s.cell))] = COLOURS[s.colour]
    return image


def batch(rng, n, plain=0.0, unplaced="anywhere"):
    """``n`` training scenes: images float32 (n, 3, SIDE, SIDE) in [-1, 1] and captions
    (``plain``, ``unplaced``: see ``random_scene``)."""
    scenes = [random_scene(rng, plain=plain, unplaced=unplaced) for _ in range(n)]
    images = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return images.transpose(0, 3, 1, 2), [s.caption for s in scenes]


def held_out_scenes(n=54, seed=1234):
    """``n`` one-shape evaluation scenes, each a ``HELD_OUT`` combination at a position and
    size, with the first-paraphrase caption; deterministic."""
    rng = np.random.default_rng(seed)
    combos = sorted(HELD_OUT)
    cells = list(POSITIONS)
    scenes = []
    for i in range(n):
        colour, kind, background = combos[i % len(combos)]
        cell = cells[(i // len(combos) + 2 * i) % 9]
        size = list(SIZES)[int(rng.integers(2))]
        shape = Shape(colour, kind, size, cell)
        scenes.append(Scene((shape,), background, caption((shape,), background)))
    return scenes


def validation_scenes(n=27, seed=99, shapes=1):
    """``n`` training-distribution scenes with ``shapes`` shapes (first-paraphrase captions),
    for choosing settings without looking at the held-out set; deterministic."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng)
        if len(s.shapes) == shapes:
            scenes.append(Scene(s.shapes, s.background, caption(s.shapes, s.background)))
    return scenes
