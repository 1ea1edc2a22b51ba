"""Four synthetic visual-question domains, drawn with PIL, shaped like the DMO paper's SFT domains.

* ``general``  - one coloured shape: "What colour is the shape?" / "What shape is it?"
* ``counting`` - 1-6 circles among 0-2 square distractors: "How many circles?"
* ``ocr``      - a 3-digit number in one row of 28-px cells, one digit per cell: "What number is written?"
* ``chart``    - a bar chart with one coloured bar per 28-px column: "Which bar is tallest?" /
  "What is the value of the <colour> bar?"

Every answer is one short word or number, so exact match is a fair metric. Layouts snap to the vision
tower's grid (14-px patches, 28-px merged tokens): a model with ~1M parameters trained from scratch could
not learn to read freely placed digits or shapes, but learns one digit per merged token and grid-aligned
shapes. All randomness comes from the numpy
``Generator`` passed in, so a seeded generator gives the same image bytes on every run.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmo.errors import DmoError

DOMAINS: tuple[str, ...] = ("general", "counting", "ocr", "chart")

#: The vision tower's patch side, and the side of one merged vision token (patch 14, spatial merge 2).
PATCH = 14
CELL = 28

#: Saturated colours that stay distinct after the image processor's normalisation.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
MAX_CIRCLES = 6
MAX_DISTRACTORS = 2
#: Chart bars are 1..MAX_BAR_VALUE units high.
MAX_BAR_VALUE = 8
#: Font size of OCR digits; the glyphs are ~17 px tall, well inside a 28-px cell.
DIGIT_FONT_SIZE = 24
#: OCR digits are placed at the cell centre plus a uniform offset in [-JITTER, JITTER] pixels. Even +-1 px kept
#: a 1M-parameter model from scratch at chance after 256 steps (the patch embedding is linear in pixels and
#: must see each glyph in every shift), while centred digits were read; so there is no jitter by default.
JITTER = 0

Sample = tuple[Image.Image, str, str]


def check_size(size: int) -> int:
    """Image sides must be whole merged tokens, so layouts can snap to the 28-px grid."""
    if size % CELL or not 2 * CELL <= size <= 8 * CELL:
        raise DmoError(f"tiny-world image size {size} must be a multiple of {CELL} between {2 * CELL} and {8 * CELL}")
    return size


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[int, int, int]]:
    # A random dark grey: the colour of the background carries no information about any answer.
    level = int(rng.integers(0, 56))
    bg = (level, level, level)
    return Image.new("RGB", (size, size), bg), bg


def _colour(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    names = [c for c in COLOURS if c not in exclude]
    return names[int(rng.integers(len(names)))]


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    """Draw ``shape`` filling the inclusive pixel box ``(x0, y0, x1, y1)`` (no anti-aliasing: exact colours)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise DmoError(f"unknown shape {shape!r}: choose one of {list(SHAPES)}")


def render_general(rng: np.random.Generator, size: int = 84) -> Sample:
    img, _ = _background(rng, size)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = _colour(rng)
    # Snapped to the 14-px patch grid: a shape then looks the same to the linear patch embedding wherever it
    # is (freely placed shapes left the shape question at chance).
    cells = int(rng.integers(2, min(4, size // PATCH - 1) + 1))
    side = cells * PATCH - 2
    x0 = int(rng.integers(0, size // PATCH - cells + 1)) * PATCH + 1
    y0 = int(rng.integers(0, size // PATCH - cells + 1)) * PATCH + 1
    draw_shape(ImageDraw.Draw(img), shape, (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[colour])
    if rng.random() < 0.5:
        return img, "What colour is the shape?", colour
    return img, "What shape is it?", shape


def render_counting(rng: np.random.Generator, size: int = 84) -> Sample:
    img, _ = _background(rng, size)
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(1, MAX_CIRCLES + 1))
    n_distractors = int(rng.integers(0, MAX_DISTRACTORS + 1))
    # At most one object per 14-px patch, centred in it, with a gap of >= 2 px to its neighbours.
    grid = size // PATCH
    patches = rng.choice(grid * grid, size=n + n_distractors, replace=False)
    for i, p in enumerate(patches):
        side = int(rng.integers(9, 13)) if i < n else int(rng.integers(7, 11))
        x0 = int(p % grid) * PATCH + (PATCH - side) // 2
        y0 = int(p // grid) * PATCH + (PATCH - side) // 2
        draw_shape(draw, "circle" if i < n else "square", (x0, y0, x0 + side - 1, y0 + side - 1), COLOURS[_colour(rng)])
    return img, "How many circles?", str(n)


_FONT: ImageFont.FreeTypeFont | ImageFont.ImageFont | None = None


def digit_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font: no font file from the system, so renders match across machines."""
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=DIGIT_FONT_SIZE)
    return _FONT


def draw_digit(draw: ImageDraw.ImageDraw, digit: str, cell_x: int, cell_y: int, dx: int, dy: int, fill) -> None:
    """Draw ``digit`` centred in the 28-px cell whose top-left corner is ``(cell_x, cell_y)``, shifted by (dx, dy)."""
    draw.text((cell_x + CELL / 2 + dx, cell_y + CELL / 2 + dy), digit, font=digit_font(), fill=fill, anchor="mm")


def render_ocr(rng: np.random.Generator, size: int = 84) -> Sample:
    img, _ = _background(rng, size)
    draw = ImageDraw.Draw(img)
    n_cells = size // CELL
    row = int(rng.integers(n_cells))
    # First digit non-zero: the answer reads as an ordinary number.
    digits = [str(int(rng.integers(1, 10)))] + [str(int(rng.integers(0, 10))) for _ in range(n_cells - 1)]
    fill = COLOURS[_colour(rng)]
    for col, digit in enumerate(digits):
        dx, dy = (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=2)) if JITTER else (0, 0)
        draw_digit(draw, digit, col * CELL, row * CELL, dx, dy, fill)
    return img, "What number is written?", "".join(digits)


def bar_unit(size: int) -> int:
    """Pixels per chart unit: the tallest bar leaves a 4-px margin at the top and the axis at the bottom."""
    return (size - 8) // MAX_BAR_VALUE


def render_chart(rng: np.random.Generator, size: int = 84) -> Sample:
    img, _ = _background(rng, size)
    draw = ImageDraw.Draw(img)
    n_bars = size // CELL
    unit = bar_unit(size)
    names = [str(c) for c in rng.permutation(list(COLOURS))[:n_bars]]
    # Distinct values, so "tallest" always has one answer.
    values = [int(v) for v in rng.permutation(MAX_BAR_VALUE)[:n_bars] + 1]
    base = size - 4  # y of the axis line
    for i, (name, value) in enumerate(zip(names, values)):
        x0 = i * CELL + 5
        draw.rectangle((x0, base - value * unit, x0 + CELL - 11, base - 1), fill=COLOURS[name])
    draw.line((0, base, size - 1, base), fill=(200, 200, 200), width=1)
    if rng.random() < 0.5:
        return img, "Which bar is tallest?", names[int(np.argmax(values))]
    i = int(rng.integers(n_bars))
    return img, f"What is the value of the {names[i]} bar?", str(values[i])


RENDERERS: dict[str, Callable[[np.random.Generator, int], Sample]] = {
    "general": render_general,
    "counting": render_counting,
    "ocr": render_ocr,
    "chart": render_chart,
}


def sample(domain: str, rng: np.random.Generator, size: int = 84) -> Sample:
    """One ``(image, question, answer)`` of ``domain``, drawn with ``rng``."""
    try:
        render = RENDERERS[domain]
    except KeyError:
        raise DmoError(f"unknown tiny-world domain {domain!r}: choose one of {list(DOMAINS)}") from None
    return render(rng, check_size(size))


def vocabulary() -> list[str]:
    """Every word the questions and answers can use (the tokenizer's word list), in a fixed order."""
    words = ["What", "colour", "is", "the", "shape", "it", "How", "many", "circles", "number", "written"]
    words += ["Which", "bar", "tallest", "value", "of", "?"]
    words += list(COLOURS) + list(SHAPES)
    return list(dict.fromkeys(words))
