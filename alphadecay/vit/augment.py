"""RandAugment as timm 0.4.5 does it (`timm/data/auto_augment.py`), drawing from an explicit numpy Generator.

`--aa rand-m9-mstd0.5-inc1` (the official default) means: magnitude 9 out of 10, magnitude noise N(0, 0.5) drawn per
op call and the result clipped to [0, 10], the "increasing" op list (every op gets stronger with magnitude), and
timm's defaults of 2 ops per image (chosen uniformly, with replacement) and probability 0.5 for each op to act.
Config sections: `m<int>` magnitude, `n<int>` ops per image, `mstd<float>` magnitude std, `inc<0|1>`.

The 15 ops of the increasing list and what magnitude m in [0, 10] does (x = m / 10; "+-" = sign drawn 50/50):

| op | argument | at m = 0 | at m = 10 |
|---|---|---|---|
| AutoContrast, Equalize, Invert | none | | |
| Rotate | +-30x degrees | 0 | +-30 |
| PosterizeIncreasing | keep 4 - int(4x) bits | 4 bits | 0 bits (black) |
| SolarizeIncreasing | invert pixels >= 256 - int(256x) | none | all |
| SolarizeAdd | add int(110x) to pixels < 128 | 0 | 110 |
| Color/Contrast/Brightness/SharpnessIncreasing | enhance factor 1 +- 0.9x | 1.0 | 0.1 or 1.9 |
| ShearX, ShearY | affine shear +-0.3x | 0 | +-0.3 |
| TranslateXRel, TranslateYRel | shift +-0.45x of the image size | 0 | +-45% |

Geometric ops resample with the training interpolation (bicubic officially) and fill with the dataset mean as
uint8 (124, 116, 104 for ImageNet's mean).

Two places where we differ from timm 0.4.5, neither on the official command lines' numbers:
- Posterize to 0 bits (m = 10, reached by the mstd noise about 2% of the times the op is drawn at m9): Pillow
  >= 13 raises "bits must be between 1 and 8"; the Pillow of the official environment (10.4) returned a black
  image, which we reproduce with our own lookup table (the same mask Pillow used).
- `inc0`: timm 0.4.5 tests `bool("0")`, which is True, so `inc0` still picks the increasing list; we read the
  integer (`inc0` = the original list). The official default is `inc1`.
Also not ported: `w<idx>` (weighted op choice) and the AutoAugment/AugMix policies; they raise a UserError.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from alphadecay.errors import UserError

MAX_LEVEL = 10.0
Resample = Image.Resampling | tuple[Image.Resampling, ...]  # a tuple = one drawn per op call (timm's 'random')

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order (the choice indexes into these lists).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed `--aa rand-...` string."""

    magnitude: int = 10  # timm's defaults when a section is absent
    num_layers: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False
    prob: float = 0.5  # per op; timm fixes it at 0.5

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS


def parse_rand_augment(config: str, flag: str = "--aa") -> RandAugmentSpec:
    """`rand-m9-mstd0.5-inc1` -> RandAugmentSpec(9, 2, 0.5, True); anything else a UserError naming `flag`."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise UserError(f"{flag} {config}: only RandAugment policies ('rand-...', e.g. the official "
                        f"rand-m9-mstd0.5-inc1) are supported; pass {flag} none for no auto-augmentation.")
    values: dict = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)  # timm splits each section at its first digit
        key, value = match.groups() if match else (part, "")
        try:
            if key == "mstd":
                values["magnitude_std"] = float(value)
            elif key == "m":
                values["magnitude"] = int(value)
            elif key == "n":
                values["num_layers"] = int(value)
            elif key == "inc":
                values["increasing"] = bool(int(value))
            elif key == "w":
                raise UserError(f"{flag} {config}: weighted op choice ('{part}') is not supported.")
            else:
                raise UserError(f"{flag} {config}: unknown section '{part}'. Sections: m<int> magnitude, "
                                "n<int> ops per image, mstd<float> magnitude std, inc<0|1> increasing ops.")
        except ValueError:
            raise UserError(f"{flag} {config}: cannot read a number from section '{part}'.") from None
    spec = RandAugmentSpec(**values)
    if not 0 <= spec.magnitude <= MAX_LEVEL or spec.num_layers < 0 or spec.magnitude_std < 0:
        raise UserError(f"{flag} {config}: magnitude must be in 0..10, ops per image and mstd non-negative.")
    return spec


# ------------------------------------------------------------------------------------------------------------
# The ops: PIL image in, PIL image out
# ------------------------------------------------------------------------------------------------------------
def _affine(img: Image.Image, matrix: tuple, fill: tuple, resample: Image.Resampling) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` high bits of every channel; 0 bits gives black (Pillow <= 12's result; 13 raises)."""
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands())) if img.mode in ("L", "RGB") else img


# Each op: (img, args, fill, resample) -> img; args come from the level functions below.
OpFn = Callable[[Image.Image, tuple, tuple, Image.Resampling], Image.Image]
_OPS: dict[str, OpFn] = {
    "AutoContrast": lambda img, a, f, r: ImageOps.autocontrast(img),
    "Equalize": lambda img, a, f, r: ImageOps.equalize(img),
    "Invert": lambda img, a, f, r: ImageOps.invert(img),
    "Rotate": lambda img, a, f, r: img.rotate(a[0], resample=r, fillcolor=f),
    "Posterize": lambda img, a, f, r: posterize(img, a[0]),
    "Solarize": lambda img, a, f, r: ImageOps.solarize(img, a[0]),
    "SolarizeAdd": lambda img, a, f, r: solarize_add(img, a[0]),
    "Color": lambda img, a, f, r: ImageEnhance.Color(img).enhance(a[0]),
    "Contrast": lambda img, a, f, r: ImageEnhance.Contrast(img).enhance(a[0]),
    "Brightness": lambda img, a, f, r: ImageEnhance.Brightness(img).enhance(a[0]),
    "Sharpness": lambda img, a, f, r: ImageEnhance.Sharpness(img).enhance(a[0]),
    "ShearX": lambda img, a, f, r: _affine(img, (1, a[0], 0, 0, 1, 0), f, r),
    "ShearY": lambda img, a, f, r: _affine(img, (1, 0, 0, a[0], 1, 0), f, r),
    "TranslateXRel": lambda img, a, f, r: _affine(img, (1, 0, a[0] * img.size[0], 0, 1, 0), f, r),
    "TranslateYRel": lambda img, a, f, r: _affine(img, (1, 0, 0, 0, 1, a[0] * img.size[1]), f, r),
}
for _base in ("Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"):
    _OPS[_base + "Increasing"] = _OPS[_base]


# Level functions: (magnitude in [0, 10], rng) -> the op's arguments (timm's *_level_to_arg).
def _negate(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() > 0.5 else value


LevelFn = Callable[[float, np.random.Generator], tuple]
_LEVELS: dict[str, LevelFn] = {
    "AutoContrast": lambda m, rng: (),
    "Equalize": lambda m, rng: (),
    "Invert": lambda m, rng: (),
    "Rotate": lambda m, rng: (_negate(m / MAX_LEVEL * 30.0, rng),),
    "Posterize": lambda m, rng: (int(m / MAX_LEVEL * 4),),
    "PosterizeIncreasing": lambda m, rng: (4 - int(m / MAX_LEVEL * 4),),
    "Solarize": lambda m, rng: (int(m / MAX_LEVEL * 256),),
    "SolarizeIncreasing": lambda m, rng: (256 - int(m / MAX_LEVEL * 256),),
    "SolarizeAdd": lambda m, rng: (int(m / MAX_LEVEL * 110),),
    "ShearX": lambda m, rng: (_negate(m / MAX_LEVEL * 0.3, rng),),
    "ShearY": lambda m, rng: (_negate(m / MAX_LEVEL * 0.3, rng),),
    "TranslateXRel": lambda m, rng: (_negate(m / MAX_LEVEL * 0.45, rng),),
    "TranslateYRel": lambda m, rng: (_negate(m / MAX_LEVEL * 0.45, rng),),
}
for _base in ("Color", "Contrast", "Brightness", "Sharpness"):
    _LEVELS[_base] = lambda m, rng: (m / MAX_LEVEL * 1.8 + 0.1,)
    _LEVELS[_base + "Increasing"] = lambda m, rng: (1.0 + _negate(m / MAX_LEVEL * 0.9, rng),)

OP_NAMES = tuple(_OPS)


def apply_op(name: str, img: Image.Image, magnitude: float, rng: np.random.Generator, *,
             fill: tuple[int, ...], resample: Resample) -> Image.Image:
    """One op at a given magnitude (clipped to [0, 10]), unconditionally: what RandAugment does once it has
    decided that the op acts and drawn its magnitude."""
    magnitude = min(MAX_LEVEL, max(0.0, magnitude))
    args = _LEVELS[name](magnitude, rng)
    if isinstance(resample, tuple):
        resample = resample[rng.integers(len(resample))]
    return _OPS[name](img, args, fill, resample)


class RandAugment:
    """`__call__(img, rng)`: pick `num_layers` ops uniformly with replacement; each acts with probability `prob`
    at magnitude N(magnitude, magnitude_std) clipped to [0, 10] (timm's AugmentOp + RandAugment)."""

    def __init__(self, spec: RandAugmentSpec, *, fill: tuple[int, ...], resample: Resample) -> None:
        self.spec = spec
        self.fill = fill
        self.resample = resample

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        ops = self.spec.ops
        for choice in rng.integers(len(ops), size=self.spec.num_layers):
            if self.spec.prob < 1.0 and rng.random() > self.spec.prob:
                continue
            magnitude = float(self.spec.magnitude)
            if self.spec.magnitude_std > 0:
                magnitude = rng.normal(magnitude, self.spec.magnitude_std)
            img = apply_op(ops[choice], img, magnitude, rng, fill=self.fill, resample=self.resample)
        return img

    def __repr__(self) -> str:
        s = self.spec
        return (f"RandAugment(magnitude={s.magnitude}, num_layers={s.num_layers}, magnitude_std={s.magnitude_std}, "
                f"increasing={s.increasing}, prob={s.prob})")
