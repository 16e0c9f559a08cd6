"""The official ViT code's image pipelines (ConvNeXt's `datasets.build_transform` over timm 0.4.5's
`create_transform`), written on PIL + numpy, with every random draw taken from an explicit numpy Generator.

Training (`build_train_transform`), in this order:
1. input_size > 32: RandomResizedCrop(input_size, scale (0.08, 1), ratio (3/4, 4/3), `--train_interpolation`);
   input_size <= 32: the official code replaces it with RandomCrop(input_size, padding=4) (zero padding, no resize:
   CIFAR-style, so 32 px images are used at their own size);
2. horizontal flip with probability 0.5;
3. RandAugment (`--aa`, augment.py), or, only when `--aa none`, ColorJitter(`--color_jitter`) on brightness,
   contrast and saturation (timm turns colour jitter off whenever an auto-augment policy is set);
4. to a float tensor in [0, 1], normalised by the ImageNet mean and std;
5. random erasing (`--reprob`, `--remode`, `--recount`) on the normalised tensor: area 2%-33% of the image (split
   over the count), aspect ratio 0.3-3.3 (log-uniform), up to 10 tries; mode `pixel` fills with N(0, 1) noise per
   pixel, `rand` one N(0, 1) colour per channel, `const` zeros.

Evaluation (`build_eval_transform`): input_size < 384: resize the shorter side to int(input_size / crop_pct)
(bicubic; crop_pct None means 224/256 = 0.875, so 256 for 224) and center-crop input_size; input_size >= 384: warp
to input_size x input_size; input_size <= 32: no resize and no crop at all (the official code's CIFAR branch), so
the images must already be input_size x input_size. Then to tensor and normalise.

Determinism. A training sample's augmentation depends only on (seed, epoch, dataset index) through
`sample_rng(seed, epoch, index)`, never on the rank, the number of ranks, the batch size, the loader workers or
where a run was resumed: a resumed run re-draws exactly what the uninterrupted run drew, with no RNG state to
save. (The official code draws from each DataLoader worker's global `random`/`numpy`/`torch` state, so its
augmentations are not reproducible across worker counts; ours follow the same distributions, not its streams.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from alphadecay.errors import UserError
from alphadecay.vit.augment import RandAugment, Resample, parse_rand_augment

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 224 / 256
SMALL_IMAGE = 32  # input sizes up to this use the official code's CIFAR-style pipelines

INTERPOLATIONS: dict[str, Resample] = {
    "bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS, "hamming": Image.Resampling.HAMMING,
    "random": (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC),  # one of the two per image (timm)
}
# Separate streams for per-sample and per-batch draws, so no sample's stream equals any batch's stream.
_SAMPLE_STREAM, _BATCH_STREAM = 0, 1


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for the augmentation of dataset sample `index` in `epoch` (all non-negative integers)."""
    return np.random.default_rng([seed, epoch, index, _SAMPLE_STREAM])


def batch_rng(seed: int, epoch: int, step: int, rank: int) -> np.random.Generator:
    """The generator for batch-level draws (Mixup/CutMix) of micro-batch `step` of `epoch` on `rank`."""
    return np.random.default_rng([seed, epoch, step, rank, _BATCH_STREAM])


def interpolation(name: str, flag: str = "--train_interpolation") -> Resample:
    if name not in INTERPOLATIONS:
        raise UserError(f"{flag} {name}: unknown interpolation; valid: {', '.join(INTERPOLATIONS)}.")
    return INTERPOLATIONS[name]


def _pick(resample: Resample, rng: np.random.Generator) -> Image.Resampling:
    return resample[rng.integers(len(resample))] if isinstance(resample, tuple) else resample


# ------------------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------------------
def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of timm's RandomResizedCrop: 10 tries at a random area and log-uniform aspect
    ratio, then a central crop clamped to the ratio range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resize_shorter(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's Resize(int): the shorter side to `size`, the longer to int(size * long / short)."""
    w, h = img.size
    if w <= h:
        out = (size, int(size * h / w))
    else:
        out = (int(size * w / h), size)
    return img if out == img.size else img.resize(out, resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop (round-half-even offsets) for images at least `size` on each side."""
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pad_and_random_crop(img: Image.Image, size: int, padding: int, rng: np.random.Generator) -> Image.Image:
    """torchvision's RandomCrop(size, padding): zero-pad every side, then a uniform size x size window."""
    w, h = img.size
    padded = Image.new(img.mode, (w + 2 * padding, h + 2 * padding))  # black (0) borders
    padded.paste(img, (padding, padding))
    pw, ph = padded.size
    if pw < size or ph < size:
        raise ValueError(f"a {w}x{h} image padded by {padding} is smaller than the {size} px crop")
    top = int(rng.integers(0, ph - size + 1)) if ph > size else 0
    left = int(rng.integers(0, pw - size + 1)) if pw > size else 0
    return padded.crop((left, top, left + size, top + size))


# ------------------------------------------------------------------------------------------------------------
# Tensor steps
# ------------------------------------------------------------------------------------------------------------
def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) float32: pixel / 255, then (x - mean) / std per channel (torchvision ToTensor + Normalize)."""
    array = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)
    x = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


class RandomErasing:
    """timm's RandomErasing for one normalised (C, H, W) tensor, in place; see the module docstring."""

    def __init__(self, probability: float, *, mode: str = "pixel", min_count: int = 1, max_count: int | None = None,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise UserError(f"--remode {mode}: valid modes are pixel, rand, const.")
        self.probability = probability
        self.mode = mode
        self.min_count = min_count
        self.max_count = max_count or min_count
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if rng.random() > self.probability:
            return x
        chan, img_h, img_w = x.shape
        area = img_h * img_w
        count = self.min_count if self.min_count == self.max_count else int(rng.integers(self.min_count,
                                                                                           self.max_count + 1))
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    top = int(rng.integers(0, img_h - h + 1))
                    left = int(rng.integers(0, img_w - w + 1))
                    x[:, top:top + h, left:left + w] = self._fill((chan, h, w), rng)
                    break
        return x

    def _fill(self, shape: tuple[int, int, int], rng: np.random.Generator) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
        if self.mode == "rand":
            return torch.from_numpy(rng.standard_normal((shape[0], 1, 1), dtype=np.float32))
        return torch.zeros((shape[0], 1, 1))

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.probability}, mode={self.mode}, count={self.min_count}..{self.max_count})"


class ColorJitter:
    """torchvision's ColorJitter(b, c, s) on PIL: factors U(1 - v, 1 + v), applied in a random order."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
        lo, hi = max(0.0, 1 - self.strength), 1 + self.strength
        factors = [rng.uniform(lo, hi) for _ in enhancers]
        for i in rng.permutation(len(enhancers)):
            img = enhancers[i](img).enhance(factors[i])
        return img

    def __repr__(self) -> str:
        return f"ColorJitter({self.strength})"


# ------------------------------------------------------------------------------------------------------------
# The pipelines
# ------------------------------------------------------------------------------------------------------------
class TrainTransform:
    """`__call__(img, rng) -> (3, input_size, input_size) float32`; `img` is an RGB PIL image."""

    def __init__(self, input_size: int, *, resample: Resample, rand_augment: RandAugment | None,
                 color_jitter: ColorJitter | None, erasing: RandomErasing | None, hflip: float,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.input_size = input_size
        self.resample = resample
        self.rand_augment = rand_augment
        self.color_jitter = color_jitter
        self.erasing = erasing
        self.hflip = hflip
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        size = self.input_size
        if size > SMALL_IMAGE:
            top, left, h, w = random_resized_crop_box(img.size[0], img.size[1], rng)
            img = img.crop((left, top, left + w, top + h)).resize((size, size), _pick(self.resample, rng))
        else:
            img = pad_and_random_crop(img, size, 4, rng)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        elif self.color_jitter is not None:
            img = self.color_jitter(img, rng)
        x = to_normalized_tensor(img, self.mean, self.std)
        return self.erasing(x, rng) if self.erasing is not None else x

    def __repr__(self) -> str:
        crop = (f"RandomResizedCrop({self.input_size}, scale=(0.08, 1), ratio=(3/4, 4/3), {self.resample})"
                if self.input_size > SMALL_IMAGE else f"RandomCrop({self.input_size}, padding=4)")
        steps = [crop, f"HorizontalFlip({self.hflip})", repr(self.rand_augment or self.color_jitter),
                 f"Normalize(mean={self.mean}, std={self.std})", repr(self.erasing)]
        return "TrainTransform(" + " -> ".join(s for s in steps if s != "None") + ")"


def build_train_transform(input_size: int, *, aa: str | None = "rand-m9-mstd0.5-inc1",
                          train_interpolation: str = "bicubic", reprob: float = 0.25, remode: str = "pixel",
                          recount: int = 1, color_jitter: float | None = 0.4, hflip: float = 0.5,
                          mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                          std: Sequence[float] = IMAGENET_DEFAULT_STD) -> TrainTransform:
    """The official training pipeline (defaults = the official flags' defaults). `aa` None, "" or "none" turns
    RandAugment off (and colour jitter on, if `color_jitter`); `reprob` 0 turns random erasing off."""
    resample = interpolation(train_interpolation)
    rand_augment = None
    if aa not in (None, "", "none"):
        fill = tuple(min(255, round(255 * m)) for m in mean)  # timm's img_mean hparam
        rand_augment = RandAugment(parse_rand_augment(aa), fill=fill, resample=resample)
    jitter = ColorJitter(color_jitter) if rand_augment is None and color_jitter else None
    if not 0 <= reprob <= 1:
        raise UserError(f"--reprob {reprob}: a probability must be in [0, 1].")
    if recount < 1:
        raise UserError(f"--recount {recount}: at least 1 erased box.")
    erasing = RandomErasing(reprob, mode=remode, max_count=recount) if reprob > 0 else None
    return TrainTransform(input_size, resample=resample, rand_augment=rand_augment, color_jitter=jitter,
                          erasing=erasing, hflip=hflip, mean=mean, std=std)


class EvalTransform:
    """`__call__(img) -> (3, input_size, input_size) float32`, deterministic."""

    def __init__(self, input_size: int, *, crop_pct: float, resample: Image.Resampling,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.input_size = input_size
        self.crop_pct = crop_pct
        self.resample = resample
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def resize_to(self) -> int | None:
        """The shorter side before the center crop (None: no resize, <= 32 px, or a warp, >= 384 px)."""
        if self.input_size <= SMALL_IMAGE or self.input_size >= 384:
            return None
        return int(self.input_size / self.crop_pct)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        size = self.input_size
        if size >= 384:
            img = img.resize((size, size), self.resample)
        elif size > SMALL_IMAGE:
            img = center_crop(resize_shorter(img, self.resize_to, self.resample), size)
        elif img.size != (size, size):
            raise ValueError(f"a {img.size[0]}x{img.size[1]} image at --input_size {size}: at 32 px or less the "
                             f"official evaluation neither resizes nor crops, so images must be {size}x{size}")
        return to_normalized_tensor(img, self.mean, self.std)

    def __repr__(self) -> str:
        if self.input_size <= SMALL_IMAGE:
            return f"EvalTransform(Normalize at {self.input_size} px, no resize)"
        if self.input_size >= 384:
            return f"EvalTransform(Resize(({self.input_size}, {self.input_size})), Normalize)"
        return f"EvalTransform(Resize({self.resize_to}), CenterCrop({self.input_size}), Normalize)"


def build_eval_transform(input_size: int, *, crop_pct: float | None = None, interpolation_name: str = "bicubic",
                         mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD) -> EvalTransform:
    """The official evaluation pipeline; `crop_pct` None is 224/256 (`--crop_pct`). Bicubic, as the official code
    hard-codes (its `--train_interpolation` does not reach evaluation)."""
    crop_pct = DEFAULT_CROP_PCT if crop_pct is None else crop_pct
    if not 0 < crop_pct <= 1:
        raise UserError(f"--crop_pct {crop_pct}: the center crop's share of the resized image must be in (0, 1].")
    resample = interpolation(interpolation_name, flag="eval interpolation")
    if isinstance(resample, tuple):
        raise UserError("evaluation needs one interpolation, not 'random'.")
    return EvalTransform(input_size, crop_pct=crop_pct, resample=resample, mean=mean, std=std)
