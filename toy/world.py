"""The toy world: a procedural text-to-image data set with named concepts.

Official Stable Diffusion weights cannot be downloaded where this project is built and tested,
and there is no GPU, so the method is measured in a world small enough for a CPU. Every image
is 64x64 RGB and shows ONE shape, filled with ONE colour and outlined in near-black, drawn
large and roughly central over the background of ONE "artist" style:

    shapes   (12) circle, oval, square, diamond, triangle, star, heart, cross, moon, ring, house, arrow
    colours  (8)  red, orange, yellow, green, blue, purple, pink, white
    styles   (20) van gogh, munch, monet, seurat, picasso, mondrian, hokusai, pollock, klimt, kandinsky,
                  rothko, warhol, escher, matisse, cezanne, turner, rembrandt, malevich, kusama, lichtenstein
             (+ "photo": a plain smooth gradient, the unstyled background)

Each artist is a coarse, high-contrast background texture with its own palette, so that a
classifier cannot mistake it and a small diffusion model can learn it at 64x64; the first nine:

    van gogh   short thick strokes swirling around a few centres, yellow and pale blue on night blue
    munch      broad wavy horizontal bands in orange, red and dark blue    (close to van gogh: curves)
    monet      large soft blurred dots in pastel pink, lilac, green, blue
    seurat     small dense crisp dots, sky dots above, park dots below     (close to monet: dots)
    picasso    large angular fragments in ochre, brown and grey-blue, outlined in dark brown
    mondrian   thick black grid lines on white, a few red / blue / yellow blocks
    hokusai    cream sky over stripes of blue and white with pointed wave crests
    pollock    black, white and red drips and splatters on a beige canvas
    klimt      a mosaic of gold tiles, some holding a black or white dot

Close pairs are deliberate (circle / oval, square / diamond, circle / ring, square / house, van gogh /
munch, monet / seurat, mondrian / malevich, turner / rembrandt, kusama / lichtenstein, rothko / warhol):
nearby concepts are the ones that erode first when others are unlearned.
A shape is jittered in position, size and rotation, but never so much that it turns into
its neighbour (rotation stays within +-15 degrees, so a square never becomes a diamond).
All randomness comes from the seed given to `render`, so the world is reproducible.

Images are drawn at 2x and downsampled with a box filter, which gives smooth, anti-aliased
edges that an autoencoder reproduces well. Captions are written the way people write prompts
("a red circle in the style of van gogh", "a monet painting of a blue star", "a photo of a
green square"). `train_bpe` learns a tiny CLIP-convention BPE vocabulary in which every
caption word is one token, so the toy text encoder can use the same Tokenizer as SD.

Rendering uses only numpy and PIL; torch appears only to hand batches to the models.
"""

import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from clip_text import SPLIT, bytes_to_unicode, clean_text, merge_pair

SIZE = 64  # output side in pixels
SS = 2  # supersampling: draw at SIZE * SS, then box-downsample (anti-aliasing)

# ------------------------------------------------------------------------------------------
# Concepts

SHAPES = ["circle", "oval", "square", "diamond", "triangle", "star", "heart", "cross", "moon", "ring", "house",
          "arrow"]

COLOUR_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (250, 225, 40),
    "green": (45, 170, 60),
    "blue": (40, 80, 225),
    "purple": (140, 55, 190),
    "pink": (250, 135, 195),
    "white": (248, 248, 248),
}
COLOURS = list(COLOUR_RGB)

STYLES = ["van gogh", "munch", "monet", "seurat", "picasso", "mondrian", "hokusai", "pollock", "klimt",
          "kandinsky", "rothko", "warhol", "escher", "matisse", "cezanne", "turner", "rembrandt", "malevich",
          "kusama", "lichtenstein"]
PHOTO = "photo"  # the unstyled background: not an artist, not a concept to forget
STYLE_LABELS = STYLES + [PHOTO]  # what the generator draws and the classifier's style head predicts

CLOSE_PAIRS = [("circle", "oval"), ("square", "diamond"), ("circle", "ring"), ("square", "house"),
               ("van gogh", "munch"), ("monet", "seurat"), ("mondrian", "malevich"), ("turner", "rembrandt"),
               ("kusama", "lichtenstein"), ("rothko", "warhol")]


def concept_kind(name: str) -> str:
    """'style' for an artist, 'object' for a shape, 'colour' for a colour."""
    if name in STYLES:
        return "style"
    if name in SHAPES:
        return "object"
    if name in COLOURS:
        return "colour"
    raise ValueError(f"{name!r} is not a toy-world concept; choose a style ({', '.join(STYLES)}), a shape "
                     f"({', '.join(SHAPES)}) or a colour ({', '.join(COLOURS)})")


# ------------------------------------------------------------------------------------------
# Shapes: outlines in unit coordinates (radius about 1, y pointing down), then jittered


def _unit_outline(shape: str) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    if shape == "circle":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "oval":  # always wide, never turned upright, so it stays apart from the circle
        return np.stack([1.05 * np.cos(t), 0.58 * np.sin(t)], 1)
    if shape == "square":
        return 0.82 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if shape == "diamond":  # a tall rhombus, not a rotated square
        return np.array([[0, -1.1], [0.72, 0], [0, 1.1], [-0.72, 0]], float)
    if shape == "triangle":
        a = np.deg2rad([-90, 30, 150])
        return np.stack([1.1 * np.cos(a), 1.1 * np.sin(a) + 0.2], 1)
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.15, 0.47)
        return np.stack([r * np.cos(a), r * np.sin(a) + 0.08], 1)
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([x, y + 2.5], 1) / 15.5
    if shape == "cross":  # a plus sign with thick arms
        a, b = 1.0, 0.36
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b],
                         [b, a], [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]], float)
    if shape == "moon":  # a thick crescent: the unit circle less a bite (radius 0.75, centre 0.6 right)
        # (A hexagon was here first: at 64 px the small model drew circles and hexagons alike.)
        d, rb = 0.6, 0.75
        x = (1 + d * d - rb * rb) / (2 * d)                  # where the two circles cross, at y = +-h
        h = np.sqrt(1 - x * x)
        outer = np.linspace(np.arctan2(h, x), 2 * np.pi - np.arctan2(h, x), 48)
        inner = np.linspace(np.arctan2(-h, x - d) + 2 * np.pi, np.arctan2(h, x - d), 24)
        pts = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                              np.stack([d + rb * np.cos(inner), rb * np.sin(inner)], 1)])
        return pts + [0.25, 0]                               # centre the crescent's mass
    if shape == "ring":  # the outer edge only: _draw_shape cuts the hole (radius RING_HOLE) out of the fill
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "house":  # a square's walls under a pointed roof: close to the square, apart from the diamond
        return np.array([[-0.8, 1.0], [0.8, 1.0], [0.8, -0.1], [0, -1.0], [-0.8, -0.1]], float)
    if shape == "arrow":  # pointing right, a shaft and a wide head
        return np.array([[-1.05, -0.3], [0.15, -0.3], [0.15, -0.78], [1.05, 0], [0.15, 0.78], [0.15, 0.3],
                         [-1.05, 0.3]], float)
    raise ValueError(f"unknown shape {shape!r}")


RING_HOLE = 0.55  # the ring's inner radius, as a fraction of its outer one


def _draw_shape(img: Image.Image, shape: str, colour: str, rng: np.random.Generator) -> None:
    n = SIZE * SS
    radius = rng.uniform(17, 22) * SS
    angle = np.deg2rad(rng.uniform(-15, 15))
    centre = (SIZE / 2 + rng.uniform(-6, 6, size=2)) * SS
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = _unit_outline(shape) @ rot.T * radius + centre
    pts = [tuple(p) for p in np.clip(pts, 1, n - 2)]
    # a little colour jitter, so the classifier accepts a diffusion model's slightly-off colours
    fill = tuple(int(c) for c in np.clip(np.array(COLOUR_RGB[colour]) + rng.integers(-12, 13, 3), 0, 255))
    d = ImageDraw.Draw(img)
    if shape == "ring":  # fill a mask, cut the hole out of it, so the background shows through
        hole = [tuple(p) for p in (_unit_outline("circle") * RING_HOLE) @ rot.T * radius + centre]
        mask = Image.new("L", img.size, 0)
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        ImageDraw.Draw(mask).polygon(hole, fill=0)
        img.paste(fill, mask=mask)
        d.line(hole + hole[:1], fill=(25, 20, 20), width=int(2.5 * SS), joint="curve")
    else:
        d.polygon(pts, fill=fill)
    d.line(pts + pts[:1], fill=(25, 20, 20), width=int(2.5 * SS), joint="curve")


# ------------------------------------------------------------------------------------------
# Style backgrounds. Each draws on an (n, n) canvas, n = SIZE * SS; lengths are in 64-px units * SS.


def _jitter(rgb, rng, amount=14):
    return tuple(int(c) for c in np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _grid(n):
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / SS  # in 64-px units
    return x, y


def _photo(rng):
    # a plain vertical-ish gradient between two muted tones: no texture at all
    n = SIZE * SS
    tones = [(205, 215, 225), (185, 190, 200), (225, 220, 205), (170, 185, 195), (215, 205, 200), (150, 160, 170)]
    a, b = (np.array(_jitter(tones[i], rng, 10), np.float32) for i in rng.choice(len(tones), 2, replace=False))
    x, y = _grid(n)
    angle = rng.uniform(-0.5, 0.5)
    u = (np.sin(angle) * (x - 32) + np.cos(angle) * (y - 32)) / 64 + 0.5
    u = np.clip(u, 0, 1)[..., None]
    return Image.fromarray(((1 - u) * a + u * b).astype(np.uint8))


def _van_gogh(rng):
    n = SIZE * SS
    img = Image.new("RGB", (n, n), _jitter((25, 45, 115), rng))
    d = ImageDraw.Draw(img)
    centres = rng.uniform(8, 56, size=(3, 2))
    spins = rng.choice([-1, 1], size=3)
    palette = np.array([(245, 215, 60), (120, 165, 235), (225, 235, 245), (60, 100, 200), (245, 215, 60)])
    colours = np.clip(palette[rng.integers(len(palette), size=110)] + rng.integers(-10, 11, (110, 3)), 0, 255)
    p = rng.uniform(0, 64, size=(110, 2))  # stroke starts
    path = [p]
    for _ in range(7):  # every stroke follows the swirl of its nearest centre: short curved strokes
        r = p[:, None] - centres[None]  # (strokes, centres, 2)
        k = np.argmin((r**2).sum(-1), 1)
        r = r[np.arange(len(p)), k]
        r = r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-6)
        tangent = spins[k, None] * np.stack([-r[:, 1], r[:, 0]], 1)
        p = p + 1.8 * (tangent - 0.15 * r)
        path.append(p)
    path = np.stack(path, 1) * SS  # (strokes, 8, 2)
    for pts, colour in zip(path, colours):
        d.line([tuple(q) for q in pts], fill=tuple(int(c) for c in colour), width=int(2.5 * SS))  # no joints: turns are gentle
    return img


def _munch(rng):
    n = SIZE * SS
    x, y = _grid(n)
    wave = 5 * np.sin(2 * np.pi * x / rng.uniform(40, 60) + rng.uniform(0, 2 * np.pi))
    wave += 2.5 * np.sin(2 * np.pi * x / rng.uniform(18, 26) + rng.uniform(0, 2 * np.pi))
    v = y + wave + 3 * np.sin(2 * np.pi * y / 64 + rng.uniform(0, 2 * np.pi))
    palette = np.array([(235, 125, 40), (205, 60, 35), (245, 185, 75), (230, 100, 50), (45, 55, 110), (95, 105, 140)])
    band = np.floor(v / 6.5 + rng.uniform(0, 6)).astype(int) % len(palette)
    img = Image.fromarray(palette[band].astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.6 * SS))


def _monet(rng):
    n = SIZE * SS
    x, y = _grid(n)
    top, bottom = np.array(_jitter((200, 215, 230), rng, 10)), np.array(_jitter((185, 215, 175), rng, 10))
    u = (y / 64)[..., None]
    img = Image.fromarray(((1 - u) * top + u * bottom).astype(np.uint8))
    d = ImageDraw.Draw(img)
    palette = [(245, 180, 205), (205, 180, 235), (170, 215, 160), (165, 200, 240), (245, 235, 185), (235, 205, 225)]
    for _ in range(55):
        cx, cy = rng.uniform(-2, 66, size=2)
        r = rng.uniform(4, 7)
        d.ellipse([(cx - r) * SS, (cy - r) * SS, (cx + r) * SS, (cy + r) * SS],
                  fill=_jitter(palette[rng.integers(len(palette))], rng, 10))
    return img.filter(ImageFilter.GaussianBlur(1.8 * SS))


def _seurat(rng):
    n = SIZE * SS
    img = Image.new("RGB", (n, n), _jitter((240, 232, 205), rng, 8))
    d = ImageDraw.Draw(img)
    horizon = rng.uniform(22, 36)
    sky = [(95, 150, 225), (250, 215, 70), (140, 190, 240), (245, 245, 235)]
    park = [(35, 140, 65), (80, 185, 60), (35, 70, 165), (230, 120, 35)]
    for gy in np.arange(1.5, 64, 4.6):
        for gx in np.arange(1.5, 64, 4.6):
            cx, cy = gx + rng.uniform(-0.8, 0.8), gy + rng.uniform(-0.8, 0.8)
            palette = sky if cy < horizon else park
            r = 1.9
            d.ellipse([(cx - r) * SS, (cy - r) * SS, (cx + r) * SS, (cy + r) * SS],
                      fill=palette[rng.integers(len(palette))])
    return img


def _picasso(rng):
    n = SIZE * SS
    palette = [(200, 150, 70), (135, 90, 50), (100, 120, 145), (220, 200, 160), (95, 95, 60), (170, 110, 80)]
    img = Image.new("RGB", (n, n), _jitter(palette[rng.integers(len(palette))], rng))
    d = ImageDraw.Draw(img)
    for _ in range(14):  # big flat triangles and quads with hard dark edges
        c = rng.uniform(-4, 68, size=2)
        k = rng.integers(3, 5)
        a = np.sort(rng.uniform(0, 2 * np.pi, k))
        r = rng.uniform(10, 26, k)
        pts = [tuple((c + ri * np.array([np.cos(ai), np.sin(ai)])) * SS) for ai, ri in zip(a, r)]
        d.polygon(pts, fill=_jitter(palette[rng.integers(len(palette))], rng), outline=(50, 35, 25), width=int(1.5 * SS))
    return img


def _mondrian(rng):
    n = SIZE * SS
    img = Image.new("RGB", (n, n), (240, 238, 230))
    d = ImageDraw.Draw(img)
    xs = np.sort(np.concatenate([[0], rng.uniform(6, 58, rng.integers(2, 4)), [64]]))
    ys = np.sort(np.concatenate([[0], rng.uniform(6, 58, rng.integers(2, 4)), [64]]))
    primaries = [(215, 30, 30), (25, 55, 170), (245, 210, 30)]
    for i in range(len(xs) - 1):
        for j in range(len(ys) - 1):
            if rng.random() < 0.35:
                d.rectangle([xs[i] * SS, ys[j] * SS, xs[i + 1] * SS, ys[j + 1] * SS], fill=primaries[rng.integers(3)])
    w = int(3 * SS)
    for v in xs[1:-1]:
        d.line([(v * SS, 0), (v * SS, n)], fill=(15, 15, 15), width=w)
    for v in ys[1:-1]:
        d.line([(0, v * SS), (n, v * SS)], fill=(15, 15, 15), width=w)
    return img


def _hokusai(rng):
    n = SIZE * SS
    x, y = _grid(n)
    period = rng.uniform(12, 18)
    phase = rng.uniform(0, 1)
    crest = 4 * np.abs(np.sin(np.pi * (x / period + phase)))  # pointed crests, unlike munch's round waves
    v = y - crest
    sea = np.array([(20, 40, 105), (45, 95, 160), (130, 180, 220), (245, 245, 235)])
    band = np.floor(v / 4.5 + rng.uniform(0, 4)).astype(int) % 4
    rgb = sea[band]
    sky = y < rng.uniform(8, 16) + crest
    rgb[sky] = _jitter((235, 220, 185), rng, 8)
    return Image.fromarray(rgb.astype(np.uint8))


def _pollock(rng):
    n = SIZE * SS
    img = Image.new("RGB", (n, n), _jitter((225, 212, 185), rng, 8))
    d = ImageDraw.Draw(img)
    paints = [(20, 20, 20), (20, 20, 20), (250, 250, 245), (170, 50, 35), (110, 110, 110)]
    for _ in range(16):  # drips: random walks with momentum
        p = rng.uniform(0, 64, 2)
        heading = rng.uniform(0, 2 * np.pi)
        pts = [tuple(p * SS)]
        for _ in range(12):
            heading += rng.normal(0, 0.6)
            p = p + 3.5 * np.array([np.cos(heading), np.sin(heading)])
            pts.append(tuple(p * SS))
        d.line(pts, fill=paints[rng.integers(len(paints))], width=int(rng.uniform(1.5, 2.5) * SS), joint="curve")
    for _ in range(30):  # splatters
        cx, cy = rng.uniform(0, 64, 2)
        r = rng.uniform(1, 2.8)
        d.ellipse([(cx - r) * SS, (cy - r) * SS, (cx + r) * SS, (cy + r) * SS], fill=paints[rng.integers(len(paints))])
    return img


def _klimt(rng):
    n = SIZE * SS
    img = Image.new("RGB", (n, n), (70, 50, 20))
    d = ImageDraw.Draw(img)
    golds = [(215, 170, 45), (185, 135, 35), (240, 205, 100), (200, 155, 60)]
    tile = 6.4
    for gy in np.arange(0, 64, tile):
        for gx in np.arange(0, 64, tile):
            x0, y0 = (gx + 0.6) * SS, (gy + 0.6) * SS
            d.rectangle([x0, y0, x0 + (tile - 1.2) * SS, y0 + (tile - 1.2) * SS], fill=_jitter(golds[rng.integers(4)], rng, 12))
            if rng.random() < 0.3:
                cx, cy, r = (gx + tile / 2) * SS, (gy + tile / 2) * SS, 1.4 * SS
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=[(30, 25, 20), (245, 240, 225), (40, 120, 110)][rng.integers(3)])
    return img


def _kandinsky(rng):
    # concentric rings of bright colour and thin straight black lines on warm cream
    n = SIZE * SS
    img = Image.new("RGB", (n, n), _jitter((238, 228, 200), rng, 8))
    d = ImageDraw.Draw(img)
    brights = [(215, 45, 45), (35, 80, 190), (245, 195, 30), (40, 150, 90), (235, 120, 35), (120, 60, 160)]
    for _ in range(6):
        cx, cy = rng.uniform(0, 64, 2)
        r = rng.uniform(5, 11)
        for k, f in enumerate((1.0, 0.66, 0.33)):
            q = r * f
            d.ellipse([(cx - q) * SS, (cy - q) * SS, (cx + q) * SS, (cy + q) * SS],
                      fill=brights[rng.integers(len(brights))])
    for _ in range(5):
        a, b = rng.uniform(-8, 72, 2), rng.uniform(-8, 72, 2)
        d.line([tuple(a * SS), tuple(b * SS)], fill=(20, 20, 20), width=int(1.2 * SS))
    return img


def _rothko(rng):
    # two or three soft-edged horizontal colour fields, deep and warm, over a dark ground
    n = SIZE * SS
    fields = [(150, 25, 30), (225, 95, 35), (95, 20, 55), (240, 165, 60), (60, 25, 35), (190, 55, 45)]
    img = Image.new("RGB", (n, n), _jitter((75, 20, 25), rng, 10))
    d = ImageDraw.Draw(img)
    k = rng.integers(2, 4)
    edges = np.linspace(4, 60, k + 1)
    edges[1:-1] += rng.uniform(-3, 3, k - 1)
    for i in range(k):
        d.rectangle([5 * SS, (edges[i] + 1.5) * SS, 59 * SS, (edges[i + 1] - 1.5) * SS],
                    fill=_jitter(fields[rng.integers(len(fields))], rng, 12))
    return img.filter(ImageFilter.GaussianBlur(2.2 * SS))


def _warhol(rng):
    # pop art: four flat neon quadrants with crisp edges    (close to rothko: flat colour fields)
    n = SIZE * SS
    neons = [(255, 60, 160), (40, 210, 230), (250, 235, 40), (120, 230, 60), (255, 140, 20), (150, 80, 240)]
    img = Image.new("RGB", (n, n))
    d = ImageDraw.Draw(img)
    cx, cy = rng.uniform(26, 38, 2)
    picks = rng.choice(len(neons), 4, replace=False)
    boxes = [(0, 0, cx, cy), (cx, 0, 64, cy), (0, cy, cx, 64), (cx, cy, 64, 64)]
    for (x0, y0, x1, y1), i in zip(boxes, picks):
        d.rectangle([x0 * SS, y0 * SS, x1 * SS, y1 * SS], fill=_jitter(neons[i], rng, 8))
    return img


def _escher(rng):
    # a black-and-white tessellation: a checkerboard of cells, each split diagonally
    n = SIZE * SS
    x, y = _grid(n)
    cell = rng.uniform(7, 10)
    a = rng.uniform(-0.4, 0.4)
    u, v = np.cos(a) * x + np.sin(a) * y, -np.sin(a) * x + np.cos(a) * y
    i, j = np.floor(u / cell), np.floor(v / cell)
    upper = (u / cell - i) > (v / cell - j)
    black = ((i + j).astype(int) % 2 == 0) ^ upper
    ink, paper = _jitter((25, 25, 25), rng, 6), _jitter((235, 235, 225), rng, 6)
    return Image.fromarray(np.where(black[..., None], ink, paper).astype(np.uint8))


def _matisse(rng):
    # paper cut-outs: big flat leaf-like blobs, unoutlined, on a saturated flat ground
    n = SIZE * SS
    grounds = [(30, 60, 170), (200, 40, 45), (240, 150, 30)]
    cutouts = [(250, 245, 235), (60, 160, 80), (245, 130, 170), (250, 210, 40), (25, 25, 30)]
    g = rng.integers(len(grounds))
    img = Image.new("RGB", (n, n), _jitter(grounds[g], rng, 10))
    d = ImageDraw.Draw(img)
    for _ in range(6):
        c = rng.uniform(-4, 68, 2)
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        r = rng.uniform(6, 11) * (1 + 0.35 * np.sin(rng.integers(3, 6) * t + rng.uniform(0, 6)))
        pts = [tuple((c + ri * np.array([np.cos(ti), np.sin(ti)])) * SS) for ti, ri in zip(t, r)]
        d.polygon(pts, fill=_jitter(cutouts[rng.integers(len(cutouts))], rng, 8))
    return img


def _cezanne(rng):
    # small parallel patches laid at one slant, in greens, ochres and blue-greys
    n = SIZE * SS
    img = Image.new("RGB", (n, n), _jitter((150, 150, 110), rng, 10))
    d = ImageDraw.Draw(img)
    palette = [(85, 125, 70), (190, 150, 80), (110, 135, 155), (205, 120, 65), (140, 165, 95), (70, 90, 110)]
    a = np.deg2rad(rng.uniform(30, 50))
    along, across = np.array([np.cos(a), -np.sin(a)]), np.array([np.sin(a), np.cos(a)])
    for _ in range(170):
        c = rng.uniform(-3, 67, 2)
        corners = [c + sx * 3.4 * along + sy * 1.5 * across for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        d.polygon([tuple(p * SS) for p in corners], fill=_jitter(palette[rng.integers(len(palette))], rng, 12))
    return img.filter(ImageFilter.GaussianBlur(0.5 * SS))


def _glow(rng, centre_rgb, mid_rgb, edge_rgb, radius):
    n = SIZE * SS
    x, y = _grid(n)
    cx, cy = rng.uniform(16, 48), rng.uniform(12, 40)
    r = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
    c, m, e = (np.array(_jitter(v, rng, 10), np.float32) for v in (centre_rgb, mid_rgb, edge_rgb))
    w1 = np.clip(r, 0, 1)[..., None]
    w2 = np.clip(r - 1, 0, 1)[..., None]
    return (1 - w1) * c + w1 * ((1 - w2) * m + w2 * e), y


def _turner(rng):
    # a hazy sun: pale gold light dissolving into orange and misty grey-blue, with soft streaks
    rgb, y = _glow(rng, (252, 240, 190), (235, 165, 70), (125, 140, 160), rng.uniform(14, 20))
    rgb += 14 * np.sin(2 * np.pi * y / rng.uniform(7, 11) + rng.uniform(0, 6))[..., None]
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(1.5 * SS))


def _rembrandt(rng):
    # chiaroscuro: a warm pool of light fading into brown-black    (close to turner: a glow)
    rgb, _ = _glow(rng, (200, 150, 80), (95, 60, 30), (28, 20, 14), rng.uniform(10, 14))
    rgb += rng.normal(0, 6, rgb.shape[:2])[..., None]   # a little canvas grain
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.8 * SS))


def _malevich(rng):
    # suprematism: tilted flat bars of black, red, blue and yellow on white    (close to mondrian)
    n = SIZE * SS
    img = Image.new("RGB", (n, n), _jitter((240, 236, 225), rng, 6))
    d = ImageDraw.Draw(img)
    inks = [(20, 20, 20), (205, 35, 30), (30, 60, 160), (240, 200, 30)]
    tilt = rng.uniform(0.3, 0.7) * rng.choice([-1, 1])
    for _ in range(6):
        c = rng.uniform(4, 60, 2)
        a = tilt + rng.normal(0, 0.12)
        half = np.array([rng.uniform(5, 16), rng.uniform(1.5, 4.5)])
        along, across = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
        corners = [c + sx * half[0] * along + sy * half[1] * across for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
        d.polygon([tuple(p * SS) for p in corners], fill=inks[rng.integers(len(inks))])
    return img


def _kusama(rng):
    # polka dots: big round dots scattered over a flat ground, black on yellow or white on red
    n = SIZE * SS
    ground, dot = [((250, 215, 30), (20, 20, 20)), ((215, 30, 40), (250, 250, 245))][rng.integers(2)]
    img = Image.new("RGB", (n, n), _jitter(ground, rng, 8))
    d = ImageDraw.Draw(img)
    for _ in range(26):
        cx, cy = rng.uniform(-2, 66, 2)
        r = rng.uniform(2.5, 4.5)
        d.ellipse([(cx - r) * SS, (cy - r) * SS, (cx + r) * SS, (cy + r) * SS], fill=dot)
    return img


def _lichtenstein(rng):
    # comic halftone: a regular screen of dots that grow across the panel, and thick black ink lines
    #                                                                        (close to kusama: dots)
    n = SIZE * SS
    img = Image.new("RGB", (n, n), (248, 246, 240))
    d = ImageDraw.Draw(img)
    ink = [(220, 40, 40), (40, 90, 210)][rng.integers(2)]
    a = rng.uniform(0, 2 * np.pi)
    for gy in np.arange(1.5, 66, 3.6):
        for gx in np.arange(1.5 + (gy // 3.6 % 2) * 1.8, 66, 3.6):
            r = 0.5 + 1.1 * (0.5 + 0.5 * np.sin((np.cos(a) * gx + np.sin(a) * gy) / 20))
            d.ellipse([(gx - r) * SS, (gy - r) * SS, (gx + r) * SS, (gy + r) * SS], fill=ink)
    for _ in range(2):
        p, q = rng.uniform(-4, 68, 2), rng.uniform(-4, 68, 2)
        d.line([tuple(p * SS), tuple(q * SS)], fill=(15, 15, 15), width=int(2.5 * SS))
    return img


_BACKGROUNDS = {
    "van gogh": _van_gogh, "munch": _munch, "monet": _monet, "seurat": _seurat, "picasso": _picasso,
    "mondrian": _mondrian, "hokusai": _hokusai, "pollock": _pollock, "klimt": _klimt, "kandinsky": _kandinsky,
    "rothko": _rothko, "warhol": _warhol, "escher": _escher, "matisse": _matisse, "cezanne": _cezanne,
    "turner": _turner, "rembrandt": _rembrandt, "malevich": _malevich, "kusama": _kusama,
    "lichtenstein": _lichtenstein, PHOTO: _photo,
}


# ------------------------------------------------------------------------------------------
# Rendering


def render(shape: str, colour: str, style: str, seed: int) -> np.ndarray:
    """One image, (64, 64, 3) uint8. The same arguments always give the same pixels."""
    if shape not in SHAPES or colour not in COLOURS or style not in _BACKGROUNDS:
        raise ValueError(f"unknown concept in ({shape!r}, {colour!r}, {style!r})")
    rng = np.random.default_rng(seed)
    img = _BACKGROUNDS[style](rng)
    _draw_shape(img, shape, colour, rng)
    return np.array(img.resize((SIZE, SIZE), Image.Resampling.BOX))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 64, 64, 3) -> float (B, 3, 64, 64) in [-1, 1], the range of the VAE."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def render_batch(shapes: list[str], colours: list[str], styles: list[str], seeds: list[int]) -> torch.Tensor:
    """Many images as a float tensor (B, 3, 64, 64) in [-1, 1]."""
    return to_tensor(np.stack([render(*args) for args in zip(shapes, colours, styles, seeds)]))


# ------------------------------------------------------------------------------------------
# Captions and prompt templates


def _articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# Training captions. {obj} is "a red circle" (colour and shape) or "a circle" (shape only).
_STYLED = ["{obj} in the style of {style}", "a painting of {obj} by {style}", "a {style} painting of {obj}",
           "{obj}, painted by {style}", "{obj} by {style}", "a painting of {obj} in the style of {style}"]
_STYLE_ONLY = ["a painting in the style of {style}", "a painting by {style}", "a {style} painting",
               "artwork by {style}"]
_PHOTO = ["{obj}", "a photo of {obj}", "a picture of {obj}", "{obj} on a plain background"]


def caption(shape: str, colour: str, style: str, rng: np.random.Generator) -> str:
    """A prompt-like caption of one image. Sometimes the colour (or, for a painting, the whole
    object) is left out, so prompts such as "a painting in the style of monet" mean something."""
    u = rng.random()
    obj = f"a {colour} {shape}" if u < 0.8 else f"a {shape}"
    if style == PHOTO:
        template = _PHOTO[rng.integers(len(_PHOTO))]
    elif u < 0.92:
        template = _STYLED[rng.integers(len(_STYLED))]
    else:
        template = _STYLE_ONLY[rng.integers(len(_STYLE_ONLY))]
    return _articles(template.format(obj=obj, style=style))


# Prompt templates for unlearning, per concept kind. "{}" is the concept; {colour}, {shape},
# {style} are filled by `fill_template` with other concepts to vary the prompt.
STYLE_TEMPLATES = ["a painting in the style of {}", "a painting by {}", "a {} painting", "artwork by {}",
                   "a {colour} {shape} in the style of {}", "a painting of a {colour} {shape} by {}",
                   "a {} painting of a {shape}"]
OBJECT_TEMPLATES = ["a photo of a {}", "a {}", "a {colour} {}", "a picture of a {colour} {}",
                    "a {} in the style of {style}", "a painting of a {colour} {} by {style}"]
COLOUR_TEMPLATES = ["a {} {shape}", "a photo of a {} {shape}", "a {} {shape} in the style of {style}",
                    "a painting of a {} {shape} by {style}"]
TEMPLATES = {"style": STYLE_TEMPLATES, "object": OBJECT_TEMPLATES, "colour": COLOUR_TEMPLATES}


def fill_template(template: str, concept: str, colour: str = "red", shape: str = "circle", style: str = "monet") -> str:
    """Fill a template of TEMPLATES with the concept ('' for the empty concept) and fix the articles."""
    text = template.format(concept or "\0", colour=colour, shape=shape, style=style)
    text = re.sub(r"\ban? \0(?= in | by |$)", "", text).replace("\0", "")  # "a photo of a {}" -> "a photo of"
    return _articles(" ".join(text.split()))


def corpus() -> list[str]:
    """Every caption template and unlearning template over every concept: the text the toy
    BPE vocabulary is learned from."""
    texts = []
    for shape in SHAPES:
        for colour in COLOURS:
            for obj in (f"a {colour} {shape}", f"a {shape}"):
                texts += [_articles(t.format(obj=obj, style=s)) for t in _STYLED for s in STYLES]
                texts += [_articles(t.format(obj=obj)) for t in _PHOTO]
    texts += [_articles(t.format(style=s)) for t in _STYLE_ONLY for s in STYLES]
    for kind, names in (("style", STYLES), ("object", SHAPES), ("colour", COLOURS)):
        for template in TEMPLATES[kind]:
            texts += [fill_template(template, c, colour, shape, style)
                      for c in names + [""] for colour in COLOURS for shape in SHAPES for style in STYLES[:2]]
    return texts


def sample_batch(n: int, rng_or_seed, p_uncond: float = 0.0) -> tuple[torch.Tensor, list[str], dict[str, list[str]]]:
    """n images drawn uniformly over shape x colour x style (photo included).

    Returns images (n, 3, 64, 64) in [-1, 1], captions (the empty string with probability
    p_uncond, for classifier-free guidance), and labels {"shape", "colour", "style"} -> names.
    """
    rng = np.random.default_rng(rng_or_seed) if isinstance(rng_or_seed, (int, np.integer)) else rng_or_seed
    shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n)]
    colours = [COLOURS[i] for i in rng.integers(len(COLOURS), size=n)]
    styles = [STYLE_LABELS[i] for i in rng.integers(len(STYLE_LABELS), size=n)]
    seeds = rng.integers(2**31, size=n).tolist()
    captions = [caption(s, c, st, rng) for s, c, st in zip(shapes, colours, styles)]
    captions = [("" if rng.random() < p_uncond else t) for t in captions]
    labels = {"shape": shapes, "colour": colours, "style": styles}
    return render_batch(shapes, colours, styles, seeds), captions, labels


# ------------------------------------------------------------------------------------------
# BPE, CLIP convention (openai/CLIP simple_tokenizer.py; Sennrich et al. 2016 for the training).
# The byte table, the text cleaning and the pre-split pattern are clip_text's, so a word seen
# here is exactly the word the Tokenizer will look up.

_BYTE_SYMBOL = bytes_to_unicode()


def words(text: str) -> list[tuple[str, ...]]:
    """Text -> words as tuples of byte symbols, the last one marked with '</w>' (as CLIP does)."""
    out = []
    for chunk in SPLIT.findall(clean_text(text)):
        symbols = [_BYTE_SYMBOL[b] for b in chunk.encode("utf-8")]
        out.append(tuple(symbols[:-1]) + (symbols[-1] + "</w>",))
    return out


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    return tuple(merge_pair(list(word), pair))


def train_bpe(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Learn up to n_merges BPE merges, most frequent pair first, in the form of OpenAI's
    vocabulary file (e.g. ('circ', 'le</w>')). Stops early once every word is one symbol.
    Ties go to the pair seen first, so the result is deterministic."""
    counts: dict[tuple[str, ...], int] = {}
    for text in texts:
        for w in words(text):
            counts[w] = counts.get(w, 0) + 1
    merges, made = [], set()
    while len(merges) < n_merges:
        pairs: dict[tuple[str, str], int] = {}
        for w, c in counts.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        # a pair spelling an existing token would give two ids one string (the Tokenizer refuses)
        pairs = {p: c for p, c in pairs.items() if p[0] + p[1] not in made}
        if not pairs:
            break
        best = max(pairs, key=pairs.get)
        merges.append(best)
        made.add(best[0] + best[1])
        counts = {_merge(w, best): c for w, c in counts.items()}
    return merges


# ------------------------------------------------------------------------------------------
# A picture of the world


def concept_grid(path: str | None = None, scale: int = 2) -> Image.Image:
    """Rows = the styles (photo last), columns = a few shape / colour pairs. Saved to path if given."""
    cells = [("circle", "red"), ("oval", "blue"), ("square", "yellow"), ("diamond", "green"),
             ("triangle", "purple"), ("star", "orange"), ("heart", "pink"), ("cross", "white"), ("moon", "red"),
             ("ring", "blue"), ("house", "green"), ("arrow", "yellow")]
    side, label_w, pad = SIZE * scale, 80, 2
    grid = Image.new("RGB", (label_w + len(cells) * (side + pad), 14 + len(STYLE_LABELS) * (side + pad)), "white")
    d = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for j, (shape, colour) in enumerate(cells):
        d.text((label_w + j * (side + pad) + 2, 1), f"{colour} {shape}", fill="black", font=font)
    for i, style in enumerate(STYLE_LABELS):
        y = 14 + i * (side + pad)
        d.text((4, y + side // 2 - 6), style, fill="black", font=font)
        for j, (shape, colour) in enumerate(cells):
            cell = Image.fromarray(render(shape, colour, style, seed=1000 * i + j))
            grid.paste(cell.resize((side, side), Image.Resampling.NEAREST), (label_w + j * (side + pad), y))
    if path is not None:
        grid.save(path, optimize=True)
    return grid


if __name__ == "__main__":
    concept_grid("docs/toyworld_concepts.png", scale=1)
