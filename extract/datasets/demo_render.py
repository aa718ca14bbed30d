"""Draw one demo image: a single shape of a given colour, pattern and size on a grey background.

The background is grey (equal R, G, B) and the noise is luminance noise added equally to every
channel, so any pixel whose channels differ belongs to the object: tests use that to check boxes.
Objects are drawn at 2x and box-filtered down, which gives soft edges without an extra library.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle", "star")
PATTERNS = ("solid", "striped", "dotted")
SIZES = {"small": (0.12, 0.15), "large": (0.23, 0.27)}  # radius range as a fraction of the image side
EXTENT = {"circle": 1.0, "square": 1.2, "triangle": 1.1, "star": 1.15}  # farthest point / radius
SUPERSAMPLE = 2


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of `shape` centred at (cx, cy); r is the size, angle the rotation in radians."""
    if shape == "square":
        radii, offsets = [r * EXTENT["square"]] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape == "triangle":
        radii, offsets = [r * EXTENT["triangle"]] * 3, [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
    elif shape == "star":
        radii = [r * EXTENT["star"] if k % 2 == 0 else r * 0.5 for k in range(10)]
        offsets = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    return [(cx + rad * math.cos(off + angle), cy + rad * math.sin(off + angle)) for rad, off in zip(radii, offsets)]


def object_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """(size, size) float coverage in [0, 1]."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    s = SUPERSAMPLE
    if shape == "circle":
        draw.ellipse([s * (cx - r), s * (cy - r), s * (cx + r), s * (cy + r)], fill=255)
    else:
        draw.polygon([(s * x, s * y) for x, y in shape_polygon(shape, cx, cy, r, angle)], fill=255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


@lru_cache(maxsize=4)
def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx), shared by every image of one size (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def pattern_texture(pattern: str, colour: np.ndarray, size: int, cx: float, cy: float, r: float,
                    angle: float) -> np.ndarray:
    """(size, size, 3) float texture; stripes and dots follow the object's rotation."""
    texture = np.broadcast_to(colour, (size, size, 3)).astype(np.float32).copy()
    if pattern == "solid":
        return texture
    yy, xx = pixel_grid(size)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    period = max(6.0, 0.45 * r)
    if pattern == "striped":  # light tint of the colour: still coloured, so boxes stay checkable
        on = ((u + v) / period % 2.0) < 1.0
        texture[on] = 0.35 * colour + 0.65 * 255.0
    elif pattern == "dotted":
        du = (u / period + 0.5) % 1.0 - 0.5
        dv = (v / period + 0.5) % 1.0 - 0.5
        texture[(du ** 2 + dv ** 2) < 0.28 ** 2] = 0.3 * colour
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return texture


def render_image(shape: str, colour: str, pattern: str, size_name: str, image_size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One (S, S, 3) uint8 image and the object's box (x0, y0, x1, y1), x1/y1 exclusive."""
    s = image_size
    low, high = SIZES[size_name]
    r = float(rng.uniform(low, high)) * s
    angle = math.radians(float(rng.uniform(-20.0, 20.0)))
    margin = r * EXTENT[shape] + 2.0  # keep the whole object inside the frame
    cx, cy = (float(rng.uniform(margin, s - margin)) for _ in range(2))
    rgb = np.clip(np.array(COLOURS[colour], dtype=np.float32) + rng.uniform(-20, 20, 3), 0, 255)

    grey = float(rng.uniform(70.0, 190.0))
    gx, gy = rng.uniform(-25.0, 25.0, 2)
    yy, xx = pixel_grid(s)
    background = grey + (gx / s) * (xx - s / 2) + (gy / s) * (yy - s / 2)

    mask = object_mask(shape, s, cx, cy, r, angle)[..., None]
    texture = pattern_texture(pattern, rgb, s, cx, cy, r, angle)
    image = background[..., None] * (1.0 - mask) + texture * mask
    image += rng.normal(0.0, 6.0, (s, s, 1)).astype(np.float32)  # same noise on R, G, B: stays grey
    rows, cols = np.nonzero(mask[..., 0] > 0)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), box
