"""The reference benchmark's world: Fashion-MNIST objects composited into varied scenes.

A CLIP pretrained on web pairs encodes much more than the class: where the object is,
how big, what colour, what lies behind it. Its captions say so, which also teaches its
text tower to read the words around a class name. A model trained on plain
Fashion-MNIST learns none of that (its perturbation resistivity is about 1 and its text
tower ignores context), so defenses that remove class-irrelevant features have nothing
to act on. This module builds, offline and deterministically, what such a model needs:

- **the web corpus** (`web_pairs`): each Fashion-MNIST *training* object pasted at a
  random place, scale and rotation, tinted with a named colour, onto a background that
  is plain, a gradient, stripes, checks, speckle or clutter (small digits of
  scikit-learn's set), with a caption that names the object and some of those
  nuisances ("a small red sneaker in the top left corner of a striped blue and white
  background"). Scenes are rendered on the fly from a seeded generator, so every epoch
  shows new compositions; pretraining and poisoning draw from it.
- **the downstream task** (`load_downstream`, the data source "scenes"): Fashion-MNIST
  *test* objects, which the corpus never shows, in a presentation of their own (near the
  centre, mildly tinted, on mottled low-contrast backgrounds) and classified with the
  CLIP paper's prompt "a photo of a {}.", which no caption uses. Its "train" split
  (the first 5,000 test objects) gives defenses their shots and a validation set; its
  "test" split (the last 5,000) measures them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F

from guard.errors import InputError

from .data import FASHION_MNIST_CLASSES, ImageDataset, load_dataset

SIDE = 56  # canvas side: 7 x 7 patches of 8 px
SCENES = "scenes"  # the data source name of the downstream task
DOWNSTREAM_SPLIT = 5000  # test objects [0, 5000) -> downstream "train", the rest -> "test"
DOWNSTREAM_SEEDS = {"train": 101, "test": 102}

# Named colours of tints and backgrounds (RGB in [0, 1]).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14), "orange": (0.96, 0.55, 0.10), "yellow": (0.95, 0.88, 0.20),
    "green": (0.20, 0.70, 0.25), "cyan": (0.20, 0.80, 0.85), "blue": (0.16, 0.30, 0.88),
    "purple": (0.55, 0.22, 0.75), "pink": (0.96, 0.56, 0.74), "brown": (0.50, 0.30, 0.14),
    "white": (0.95, 0.95, 0.95), "grey": (0.52, 0.52, 0.52), "black": (0.06, 0.06, 0.06),
}
COLOURS = tuple(PALETTE)
PATTERNS = ("plain", "gradient", "striped", "checked", "speckled", "cluttered")
SIZES = ("small", "mid-sized", "large")
SIZE_RANGES = ((20, 28), (29, 38), (39, 50))  # object side in px per size word
# How the photo was taken: half are clear, the rest blurry, dark, bright, grainy or faded
# (web captions say so: "a blurry photo of a ..."), so the image tower also encodes
# sharpness, exposure and saturation, which say nothing about the class.
PHOTOS = ("clear", "blurry", "dark", "bright", "grainy", "faded")
PHOTO_WEIGHTS = (5.0, 1.0, 1.0, 1.0, 1.0, 1.0)
POSITIONS = (("top left corner", "top", "top right corner"),
             ("left side", "centre", "right side"),
             ("bottom left corner", "bottom", "bottom right corner"))
# Every caption names the class; most also name nuisances, a quarter name the class alone
# (so that the class survives the nuisances); none is the downstream prompt "a photo of a {}.".
CAPTION_TEMPLATES = (
    "a {cls}.",
    "an image of a {cls}.",
    "a picture of a {cls}.",
    "this is a {cls}.",
    "a {size} {colour} {cls} in the {pos} of a {bg}.",
    "a {colour} {cls} on a {bg}.",
    "a {size} {cls} in the {pos}.",
    "a {photo} photo of a {colour} {cls}.",
    "{cls} in {colour}, {pos}, {bg}.",
    "a {bg} behind a {size} {colour} {cls}.",
    "a {size} {cls} on a {bg}.",
    "the {pos} of this picture shows a {colour} {cls}.",
    "a {colour} {cls} at the {pos}, on a {bg}.",
    "a {photo} picture of a {size} {colour} {cls}.",
    "there is a {cls} in the {pos}, it is {colour}.",
    "a {cls} coloured {colour} on a {bg}.",
    "a {photo} photo of a {cls} on a {bg}.",
    "a {photo} image of a {size} {cls}.",
)
TWO_COLOUR_PATTERNS = ("gradient", "striped", "checked")
# Which nuisances (size, colour, position, background, photo) each caption template names.
_NAMED = torch.tensor([[f"{{{field}}}" in template for field in ("size", "colour", "pos", "bg", "photo")]
                       for template in CAPTION_TEMPLATES])
MIN_CONTRAST = 0.45  # RGB distance between an object's tint and its background colour


@dataclass(frozen=True)
class Scenes:
    """A batch of rendered scenes: images float [N, 3, SIDE, SIDE] in [0, 1] and, per
    image, the nuisance indices its caption can name (size into SIZES, position row and
    column into POSITIONS, colour and background colours into COLOURS, pattern into
    PATTERNS)."""
    images: torch.Tensor
    size: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    colour: torch.Tensor
    background: torch.Tensor
    second: torch.Tensor
    pattern: torch.Tensor
    photo: torch.Tensor

    FIELDS: ClassVar[tuple[str, ...]] = ("images", "size", "row", "col", "colour", "background", "second", "pattern",
                                         "photo")

    def take(self, index: torch.Tensor) -> "Scenes":
        return Scenes(*(getattr(self, name)[index] for name in self.FIELDS))

    def describe(self, i: int, template: int, class_name: str) -> str:
        """Scene i described by CAPTION_TEMPLATES[template] as an image of `class_name`."""
        pattern = PATTERNS[self.pattern[i]]
        background = COLOURS[self.background[i]]
        if pattern in TWO_COLOUR_PATTERNS:
            background = f"{background} and {COLOURS[self.second[i]]}"
        return CAPTION_TEMPLATES[template].format(
            size=SIZES[self.size[i]], colour=COLOURS[self.colour[i]], cls=class_name,
            pos=POSITIONS[self.row[i]][self.col[i]], bg=f"{pattern} {background} background",
            photo=PHOTOS[self.photo[i]])

    def captions(self, classes: torch.Tensor, names: Sequence[str],
                 generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
        """One caption per image naming class `names[classes[i]]` and some of the image's
        own nuisances (a template drawn from `generator`), and which image each caption is
        true of: bool [N, N], [i, j] when image i has the class and every nuisance that
        caption j names."""
        templates = torch.randint(0, len(CAPTION_TEMPLATES), (len(classes),), generator=generator)
        texts = [self.describe(i, template, names[classes[i]]) for i, template in enumerate(templates.tolist())]
        named = _NAMED[templates]  # [N, 5]: size, colour, pos, bg, photo named by caption j

        def same(values: torch.Tensor) -> torch.Tensor:
            return values[:, None] == values[None, :]

        two_colour = torch.tensor([p in TWO_COLOUR_PATTERNS for p in PATTERNS])[self.pattern]
        background = same(self.pattern) & same(self.background) & (same(self.second) | ~two_colour[None, :])
        matches = torch.stack([same(self.size), same(self.colour), same(self.row) & same(self.col), background,
                               same(self.photo)], -1)
        true_of = same(classes) & (matches | ~named[None]).all(-1)
        return texts, true_of


def caption_words() -> tuple[str, ...]:
    """Every word the corpus's captions use besides class names."""
    fields = {"cls": "", "size": " ".join(SIZES), "colour": " ".join(COLOURS), "photo": " ".join(PHOTOS),
              "pos": " ".join(p for row in POSITIONS for p in row), "bg": " ".join(PATTERNS) + " background"}
    text = " ".join(template.format(**fields) for template in CAPTION_TEMPLATES)
    return tuple(sorted({word.strip(".,") for word in text.split()} - {""}))


class ScenePairs:
    """Web-scene image-caption pairs of objects (uint8 [N, 1, 28, 28]) with `labels`, a
    pair source of training.contrastive.train_contrastive. Captions name the class and
    some of the scene's nuisances; a caption is a positive of every image it is true of.

    Without `kept` scenes each draw renders new scenes from the training generator (every
    epoch shows new compositions: pretraining). With scenes rendered once (`kept`, uint8
    images, as `render_once` makes them) the same image comes back every epoch and can
    be hardened or used to optimise a trigger beforehand (`dataset`; poisoning)."""

    def __init__(self, objects: torch.Tensor, labels: torch.Tensor, tokenizer,
                 classes: Sequence[str] = FASHION_MNIST_CLASSES, kept: Optional[Scenes] = None,
                 device: Optional[torch.device | str] = None):
        self.objects, self.labels, self.classes = objects, labels, tuple(classes)
        self.tokenizer = tokenizer
        self.kept = kept
        self.device = device  # where new scenes are painted (pretraining on a GPU paints there)
        self.dataset = None if kept is None else ImageDataset("web scenes", kept.images, labels, self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Scenes]:
        if self.kept is None:
            scenes = render_web(self.objects[index], generator, self.device)
            return scenes.images, scenes
        scenes = self.kept.take(index)
        return scenes.images.float() / 255, scenes

    def captions(self, drawn: Scenes, classes: torch.Tensor, generator: torch.Generator):
        from .contrastive import Captions

        texts, true_of = drawn.captions(classes, self.classes, generator)
        first = {}  # each unique caption once, kept where it first occurs
        for i, text in enumerate(texts):
            first.setdefault(text, i)
        columns = torch.tensor(list(first.values()))
        return Captions(self.tokenizer(list(first)), true_of[:, columns])


def web_pairs(tokenizer, seed: Optional[int] = None, limit: Optional[int] = None,
              device: Optional[torch.device | str] = None) -> ScenePairs:
    """Web-scene pairs of Fashion-MNIST's training objects (the first `limit` of them),
    rendered anew at every draw (on `device`), or once with `seed` (on the CPU)."""
    train = load_dataset("fashion-mnist", "train")
    objects, labels = train.images[:limit], train.labels[:limit]
    kept = None if seed is None else render_once(seed, limit)
    return ScenePairs(objects, labels, tokenizer, train.classes, kept, device)


@functools.lru_cache(maxsize=1)  # poisoning and trigger optimisation read the same scenes
def render_once(seed: int, limit: Optional[int]) -> Scenes:
    """Web scenes of the first `limit` Fashion-MNIST training objects, rendered with `seed`;
    images uint8."""
    objects = load_dataset("fashion-mnist", "train").images[:limit]
    generator = torch.Generator().manual_seed(seed)
    parts = [render_web(objects[start:start + 1000], generator) for start in range(0, len(objects), 1000)]
    kept = Scenes(*(torch.cat([getattr(part, name) for part in parts]) for name in Scenes.FIELDS))
    return dataclasses.replace(kept, images=(kept.images * 255).round().to(torch.uint8))


def render_web(objects: torch.Tensor, generator: torch.Generator,
               device: Optional[torch.device | str] = None) -> Scenes:
    """Web scenes of uint8 objects [N, 1, 28, 28]: every nuisance drawn from `generator`
    (a CPU generator, so the draws do not depend on the device), the images painted on
    `device` (default the CPU); the nuisance indices stay on the CPU."""
    n = len(objects)
    size = torch.randint(0, len(SIZES), (n,), generator=generator)
    low = torch.tensor([r[0] for r in SIZE_RANGES])[size]
    high = torch.tensor([r[1] for r in SIZE_RANGES])[size]
    side = low + (high - low + 1) * torch.rand(n, generator=generator)
    half = side / 2
    cx = half + (SIDE - side) * torch.rand(n, generator=generator)
    cy = half + (SIDE - side) * torch.rand(n, generator=generator)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(25)
    colour = torch.randint(0, len(COLOURS), (n,), generator=generator)
    background = _contrasting(colour, generator)
    second = torch.randint(0, len(COLOURS), (n,), generator=generator)
    pattern = torch.randint(0, len(PATTERNS), (n,), generator=generator)
    palette = torch.tensor(list(PALETTE.values()))
    canvas = _backgrounds(pattern, palette[background], palette[second], generator, device)
    # A shade of the tint that follows the object's own grey levels keeps its texture.
    tint = palette[colour][:, :, None, None]
    canvas = _paste(canvas, objects.float() / 255, tint, cx, cy, side, angle)
    photo = torch.multinomial(torch.tensor(PHOTO_WEIGHTS), n, replacement=True, generator=generator)
    canvas = _photograph(canvas, photo, generator)
    row = (cy * 3 / SIDE).long().clamp(0, 2)
    col = (cx * 3 / SIDE).long().clamp(0, 2)
    return Scenes(canvas, size, row, col, colour, background, second, pattern, photo)


def render_downstream(objects: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The downstream presentation of uint8 objects [N, 1, 28, 28]: near the centre, fairly
    large, a mild tint of any hue, on a mottled low-contrast background. Float [N, 3, SIDE, SIDE]."""
    n = len(objects)
    side = 34 + 12 * torch.rand(n, generator=generator)
    cx = SIDE / 2 + (torch.rand(n, generator=generator) * 2 - 1) * 5
    cy = SIDE / 2 + (torch.rand(n, generator=generator) * 2 - 1) * 5
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    hue = torch.rand(n, 3, generator=generator)
    tint = (0.55 + 0.45 * hue / hue.amax(1, keepdim=True))[:, :, None, None]  # light, mildly coloured
    base = 0.15 + 0.35 * torch.rand(n, 3, 1, 1, generator=generator)  # muted and darker than the object
    mottle = F.interpolate(torch.rand(n, 1, 7, 7, generator=generator), size=(SIDE, SIDE), mode="bicubic",
                           align_corners=False)
    canvas = (base * (0.75 + 0.5 * mottle)).clamp(0, 1)
    return _paste(canvas, objects.float() / 255, tint, cx, cy, side, angle)


def load_downstream(split: str) -> ImageDataset:
    """The downstream task's split as uint8 images [N, 3, SIDE, SIDE] (deterministic, cached)."""
    if split not in DOWNSTREAM_SEEDS:
        raise InputError(f"split must be one of {tuple(DOWNSTREAM_SEEDS)}, got {split!r}")
    images, labels = _downstream(split)
    return ImageDataset(SCENES, images.clone(), labels.clone(), FASHION_MNIST_CLASSES)


@functools.lru_cache(maxsize=2)
def _downstream(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    test = load_dataset("fashion-mnist", "test")
    part = slice(0, DOWNSTREAM_SPLIT) if split == "train" else slice(DOWNSTREAM_SPLIT, None)
    objects, labels = test.images[part], test.labels[part]
    generator = torch.Generator().manual_seed(DOWNSTREAM_SEEDS[split])
    images = torch.cat([render_downstream(objects[start:start + 1000], generator)
                        for start in range(0, len(objects), 1000)])
    return (images * 255).round().to(torch.uint8), labels


# --- drawing ---------------------------------------------------------------------------

def _contrasting(colour: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A background colour per image, at least MIN_CONTRAST away from the object's tint."""
    palette = torch.tensor(list(PALETTE.values()))
    allowed = (torch.cdist(palette, palette) >= MIN_CONTRAST).float()
    return torch.multinomial(allowed[colour], 1, generator=generator).squeeze(1)


def _backgrounds(pattern: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                 generator: torch.Generator, device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Backgrounds [N, 3, SIDE, SIDE] on `device` of the given PATTERNS in two colours [N, 3]."""
    n = len(pattern)
    coordinates = torch.arange(SIDE, dtype=torch.float32, device=device)
    ys, xs = torch.meshgrid(coordinates, coordinates, indexing="ij")
    theta = torch.rand(n, generator=generator).to(device) * math.pi
    along = (xs * torch.cos(theta)[:, None, None] + ys * torch.sin(theta)[:, None, None])  # [N, S, S]
    period = 6 + 8 * torch.rand(n, 1, 1, generator=generator).to(device)
    cell = torch.randint(4, 10, (n, 1, 1), generator=generator).to(device)
    pattern, first, second = pattern.to(device), first.to(device), second.to(device)
    mix = torch.zeros(n, SIDE, SIDE, device=device)
    name = {p: i for i, p in enumerate(PATTERNS)}
    gradient = (along - along.amin((1, 2), keepdim=True)) / (along.amax((1, 2), keepdim=True)
                                                              - along.amin((1, 2), keepdim=True))
    mix = torch.where((pattern == name["gradient"])[:, None, None], gradient, mix)
    stripes = (torch.sin(2 * math.pi * along / period) > 0).float()
    mix = torch.where((pattern == name["striped"])[:, None, None], stripes, mix)
    checks = (((xs // cell) + (ys // cell)) % 2).float()
    mix = torch.where((pattern == name["checked"])[:, None, None], checks, mix)
    mix = mix[:, None]
    canvas = first[:, :, None, None] * (1 - mix) + second[:, :, None, None] * mix
    speckled = (pattern == name["speckled"])[:, None, None, None]
    noise = 0.18 * torch.randn(n, 3, SIDE, SIDE, generator=generator).to(device)
    canvas = torch.where(speckled, canvas + noise, canvas).clamp(0, 1)
    cluttered = (pattern == name["cluttered"]).nonzero().flatten()
    if len(cluttered):
        canvas[cluttered] = _clutter(canvas[cluttered], generator)
    return canvas


def _photograph(canvas: torch.Tensor, photo: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scenes [N, 3, SIDE, SIDE] as taken in PHOTOS[photo]: each effect at a random strength."""
    n = len(canvas)
    strength = torch.rand(n, 1, 1, 1, generator=generator).to(canvas.device)
    photo = photo.to(canvas.device)
    name = {p: i for i, p in enumerate(PHOTOS)}

    def where(kind: str, changed: torch.Tensor) -> torch.Tensor:
        return torch.where((photo == name[kind])[:, None, None, None], changed, canvas)

    sigma = 0.8 + 1.2 * strength  # a Gaussian blur per image, sigma 0.8 to 2 px
    offsets = torch.arange(-3, 4, dtype=torch.float32, device=canvas.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma.view(n, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [N, 7]
    blurred = canvas.reshape(1, n * 3, SIDE, SIDE)
    rows = kernel.repeat_interleave(3, 0)
    blurred = F.conv2d(F.pad(blurred, (3, 3, 0, 0), mode="replicate"), rows.view(n * 3, 1, 1, 7), groups=n * 3)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 3, 3), mode="replicate"), rows.view(n * 3, 1, 7, 1), groups=n * 3)
    canvas = where("blurry", blurred.view(n, 3, SIDE, SIDE))
    canvas = where("dark", canvas * (0.35 + 0.2 * strength))
    canvas = where("bright", canvas + (1 - canvas) * (0.35 + 0.2 * strength))
    grain = torch.randn(canvas.shape, generator=generator).to(canvas.device)
    canvas = where("grainy", canvas + (0.06 + 0.06 * strength) * grain)
    grey = canvas.mean(1, keepdim=True)
    canvas = where("faded", grey + (canvas - grey) * 0.3 * strength)
    return canvas.clamp(0, 1)


def _clutter(canvas: torch.Tensor, generator: torch.Generator, count: int = 5) -> torch.Tensor:
    """Small digits of scikit-learn's set, in palette colours, scattered over `canvas`."""
    digits = _digits()
    palette = torch.tensor(list(PALETTE.values()))
    n = len(canvas)
    for _ in range(count):
        pick = torch.randint(0, len(digits), (n,), generator=generator)
        side = 9 + 6 * torch.rand(n, generator=generator)
        cx = torch.rand(n, generator=generator) * SIDE
        cy = torch.rand(n, generator=generator) * SIDE
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.pi / 4
        tint = palette[torch.randint(0, len(palette), (n,), generator=generator)][:, :, None, None]
        canvas = _paste(canvas, digits[pick], tint, cx, cy, side, angle)
    return canvas


@functools.lru_cache(maxsize=1)
def _digits() -> torch.Tensor:
    """scikit-learn's 8 x 8 digits as float [1797, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images / 16.0).float().unsqueeze(1)


def _paste(canvas: torch.Tensor, sprites: torch.Tensor, tint: torch.Tensor, cx: torch.Tensor,
           cy: torch.Tensor, side: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Composite grey sprites [N, 1, h, w] in [0, 1], tinted [N, 3, 1, 1], onto `canvas`
    with centre (cx, cy) and side `side` in px, rotated by `angle` (radians), on
    `canvas`'s device. The sprite's grey level is both its coverage (where it is not
    black) and its shade."""
    n = len(canvas)
    sprites, tint, cx, cy, side, angle = (t.to(canvas.device) for t in (sprites, tint, cx, cy, side, angle))
    scale = SIDE / side
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # affine_grid maps output coordinates in [-1, 1] to sprite coordinates.
    tx = (cx / SIDE) * 2 - 1
    ty = (cy / SIDE) * 2 - 1
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, SIDE, SIDE], align_corners=False)
    grey = F.grid_sample(sprites, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    coverage = (grey * 4).clamp(0, 1)
    shade = tint * (0.35 + 0.65 * grey)
    return canvas * (1 - coverage) + shade * coverage
