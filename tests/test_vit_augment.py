"""alphadecay.vit.augment (RandAugment) and alphadecay.vit.transforms (training/eval pipelines, random erasing,
seeding): every RandAugment op at its extreme magnitudes on real images, the config string, the draws, and the
pipelines against hand-made expectations. CPU, a few seconds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import alphadecay.vit.augment as augment
from alphadecay.errors import UserError
from alphadecay.vit.augment import (OP_NAMES, RAND_INCREASING_OPS, RandAugment, RandAugmentSpec, apply_op,
                                    parse_rand_augment, posterize)
from alphadecay.vit.transforms import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RandomErasing,
                                       build_eval_transform, build_train_transform, random_resized_crop_box,
                                       sample_rng, to_normalized_tensor)

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "digits_sample"
FILL = (124, 116, 104)  # ImageNet's mean as uint8, timm's fill
BICUBIC = Image.Resampling.BICUBIC


def real_images() -> list[Image.Image]:
    """Shipped digits at 32 px, one enlarged to a non-square 72x56 (RandAugment sees crops of any aspect)."""
    paths = [SAMPLE / "train" / "3" / "0003.png", SAMPLE / "val" / "8" / "0148.png"]
    images = [Image.open(p).convert("RGB") for p in paths]
    return images + [images[0].resize((72, 56), BICUBIC)]


def test_real_images_exist():
    assert all(img.mode == "RGB" for img in real_images())


# ------------------------------------------------------------------------------------------------------------
# The config string
# ------------------------------------------------------------------------------------------------------------
def test_parse_official_string_and_timm_defaults():
    assert parse_rand_augment("rand-m9-mstd0.5-inc1") == RandAugmentSpec(9, 2, 0.5, True)
    assert parse_rand_augment("rand-m9-mstd0.5-inc1").ops == RAND_INCREASING_OPS
    assert parse_rand_augment("rand") == RandAugmentSpec(magnitude=10, num_layers=2, magnitude_std=0.0)
    assert parse_rand_augment("rand-n3-m5").num_layers == 3
    assert parse_rand_augment("rand-m9-inc0").increasing is False  # timm 0.4.5 read bool("0") as True


@pytest.mark.parametrize("config, message", [
    ("v0", "only RandAugment"), ("augmix-m5", "only RandAugment"), ("rand-w0", "weighted"),
    ("rand-x3", "unknown section 'x3'"), ("rand-m", "cannot read a number from section 'm'"),
    ("rand-m9.5", "cannot read"),
    ("rand-m11", "magnitude must be in 0..10")])
def test_parse_rejects_what_is_not_supported(config, message):
    with pytest.raises(UserError, match=message) as err:
        parse_rand_augment(config)
    assert str(err.value).startswith(f"--aa {config}:")


# ------------------------------------------------------------------------------------------------------------
# Every op at magnitudes 0 and 10
# ------------------------------------------------------------------------------------------------------------
IDENTITY_AT_0 = {"Rotate", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                 "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("magnitude", [0, 10])
def test_every_op_at_extreme_magnitudes_on_real_images(name, magnitude):
    for seed, img in enumerate(real_images()):
        out = apply_op(name, img, magnitude, np.random.default_rng(seed), fill=FILL, resample=BICUBIC)
        assert out.mode == "RGB" and out.size == img.size
        if magnitude == 0 and name in IDENTITY_AT_0:
            assert out.tobytes() == img.tobytes(), name


def test_strongest_settings_do_what_the_table_says():
    img = real_images()[2]
    a = np.asarray(img)
    rng = np.random.default_rng(0)

    def op(name, m=10):
        return np.asarray(apply_op(name, img, m, rng, fill=FILL, resample=BICUBIC))

    assert op("PosterizeIncreasing").max() == 0  # 0 bits: black, as Pillow <= 12 gave (Pillow 13 raises)
    assert op("Posterize", 0).max() == 0
    assert np.array_equal(op("PosterizeIncreasing", 0), a & 0xF0)  # 4 bits at magnitude 0
    assert np.array_equal(op("SolarizeIncreasing"), 255 - a)  # threshold 0: everything inverted
    assert np.array_equal(op("SolarizeAdd"), np.where(a < 128, np.minimum(a.astype(int) + 110, 255), a))
    assert np.array_equal(op("Invert"), 255 - a)
    w = img.size[0]
    shifted = op("TranslateXRel")  # +-45% of the width: that many columns are the fill colour
    band = int(0.45 * w)
    left, right = shifted[:, :band - 1], shifted[:, w - band + 1:]
    assert np.all(left == FILL) or np.all(right == FILL)
    corners = op("Rotate")[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert np.all(corners == FILL)  # +-30 degrees uncovers the corners


def test_brightness_increasing_factor_is_one_plus_or_minus_point_nine():
    gray = Image.new("RGB", (8, 8), (100, 100, 100))
    seen = set()
    for seed in range(20):
        out = apply_op("BrightnessIncreasing", gray, 10, np.random.default_rng(seed), fill=FILL, resample=BICUBIC)
        seen.add(out.getpixel((0, 0))[0])
    assert seen == {10, 190}  # 100 * 0.1 and 100 * 1.9


@pytest.mark.parametrize("name", OP_NAMES)
def test_magnitudes_outside_0_10_are_clipped(name):
    img = real_images()[0]
    for low, high in ((-5.0, 0.0), (15.0, 10.0)):
        a = apply_op(name, img, low, np.random.default_rng(3), fill=FILL, resample=BICUBIC)
        b = apply_op(name, img, high, np.random.default_rng(3), fill=FILL, resample=BICUBIC)
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bits", range(0, 9))
def test_posterize_matches_pillow_where_pillow_accepts_the_bits(bits):
    img = real_images()[2]
    ours = np.asarray(posterize(img, bits))
    assert np.array_equal(ours, np.asarray(img) & (~(2 ** (8 - bits) - 1) & 0xFF))
    if bits >= 1:
        assert np.array_equal(ours, np.asarray(ImageOps.posterize(img, bits)))


# ------------------------------------------------------------------------------------------------------------
# RandAugment's draws
# ------------------------------------------------------------------------------------------------------------
def test_mstd_sampling_reaches_and_clips_both_ends_without_errors():
    """magnitude 9 with std 5: about 40% of the draws clip at 10 (Posterize 0 bits) and 4% at 0; all ops run."""
    spec = RandAugmentSpec(magnitude=9, num_layers=4, magnitude_std=5.0, increasing=True, prob=1.0)
    policy = RandAugment(spec, fill=FILL, resample=BICUBIC)
    for seed in range(150):
        for img in real_images():
            out = policy(img, np.random.default_rng(seed))
            assert out.size == img.size and out.mode == "RGB"


def test_op_choice_probability_and_magnitude_draws(monkeypatch):
    calls = []
    monkeypatch.setattr(augment, "apply_op", lambda name, img, m, rng, **kw: calls.append((name, m)) or img)
    policy = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"), fill=FILL, resample=BICUBIC)
    images = 4000
    for seed in range(images):
        policy(real_images()[0], np.random.default_rng(seed))
    assert abs(len(calls) / (2 * images) - 0.5) < 0.02  # each of the 2 layers acts with probability 0.5
    names = [c[0] for c in calls]
    assert set(names) == set(RAND_INCREASING_OPS)
    counts = np.array([names.count(n) for n in RAND_INCREASING_OPS])
    assert counts.min() > 0.7 * len(calls) / 15  # uniform choice
    magnitudes = np.array([c[1] for c in calls])
    assert abs(magnitudes.mean() - 9) < 0.05 and abs(magnitudes.std() - 0.5) < 0.05


def test_rand_augment_is_a_function_of_its_generator():
    policy = RandAugment(parse_rand_augment("rand-m9-mstd0.5-inc1"), fill=FILL, resample=BICUBIC)
    img = real_images()[2]
    outs = [policy(img, np.random.default_rng(s)).tobytes() for s in (1, 1, 2, 3, 4, 5)]
    assert outs[0] == outs[1]
    assert len(set(outs[1:])) > 2


# ------------------------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------------------------
def test_random_resized_crop_box_ranges_and_fallback():
    rng = np.random.default_rng(0)
    areas, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_box(300, 200, rng)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        areas.append(h * w / (300 * 200))
        ratios.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0
    assert 0.7 < min(ratios) and max(ratios) < 1.4
    assert random_resized_crop_box(1000, 10, rng) == (0, 493, 10, 13)  # too wide: central crop at ratio 4/3


def test_train_transform_shapes_and_determinism():
    transform = build_train_transform(224)
    img = real_images()[2].resize((300, 200))
    a = transform(img, sample_rng(0, 1, 17))
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, transform(img, sample_rng(0, 1, 17)))  # same (seed, epoch, index): same sample
    assert not torch.equal(a, transform(img, sample_rng(0, 2, 17)))
    assert not torch.equal(a, transform(img, sample_rng(1, 1, 17)))
    small = build_train_transform(32)(real_images()[0], sample_rng(0, 0, 0))
    assert small.shape == (3, 32, 32)
    text = repr(build_train_transform(224))
    assert "RandomResizedCrop(224" in text and "RandAugment(magnitude=9" in text and "RandomErasing(p=0.25" in text


def test_small_images_get_the_official_padded_random_crop():
    """<= 32 px, no RandAugment, flip or erasing: a 32 px window of the zero-padded image."""
    img = real_images()[0]
    transform = build_train_transform(32, aa="none", color_jitter=None, reprob=0.0, hflip=0.0)
    x = transform(img, sample_rng(0, 0, 5))
    padded = np.zeros((40, 40, 3), np.uint8)
    padded[4:36, 4:36] = np.asarray(img)
    windows = [to_normalized_tensor(Image.fromarray(padded[t:t + 32, l:l + 32]), IMAGENET_DEFAULT_MEAN,
                                    IMAGENET_DEFAULT_STD) for t in range(9) for l in range(9)]
    assert any(torch.equal(x, w) for w in windows)


def test_without_rand_augment_color_jitter_is_used():
    transform = build_train_transform(32, aa="none", color_jitter=0.4)
    assert transform.rand_augment is None and transform.color_jitter is not None
    assert build_train_transform(32).color_jitter is None  # off whenever an auto-augment policy is set


def test_to_normalized_tensor_values():
    img = Image.new("RGB", (2, 1), (255, 0, 128))
    x = to_normalized_tensor(img, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    assert torch.allclose(x[:, 0, 0], torch.tensor(expected))


def test_random_erasing_box_area_aspect_and_modes():
    rng = np.random.default_rng(0)
    erase = RandomErasing(1.0, mode="pixel")
    fractions = []
    for _ in range(300):
        x = erase(torch.full((3, 64, 64), 7.0), rng)
        changed = (x != 7.0).all(dim=0)
        rows, cols = changed.any(dim=1).nonzero(), changed.any(dim=0).nonzero()
        h, w = len(rows), len(cols)
        assert changed.sum() == h * w  # one rectangle
        fractions.append(h * w / 64 ** 2)
        assert 0.3 / 1.4 < h / w < 1.4 / 0.3
    assert 0.015 < min(fractions) and max(fractions) < 0.36
    assert torch.equal(RandomErasing(0.0)(torch.ones(3, 8, 8), rng), torch.ones(3, 8, 8))
    const = RandomErasing(1.0, mode="const")(torch.ones(3, 32, 32), rng)
    assert (const == 0).any() and set(const.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(UserError, match="--remode"):
        RandomErasing(0.5, mode="blur")


def test_erasing_probability():
    rng = np.random.default_rng(1)
    erase = RandomErasing(0.25)
    hits = sum(bool((erase(torch.zeros(3, 16, 16), rng) != 0).any()) for _ in range(2000))
    assert abs(hits / 2000 - 0.25) < 0.03


def test_eval_transform_resizes_to_256_and_center_crops_224():
    img = real_images()[2].resize((300, 200), BICUBIC)
    transform = build_eval_transform(224)
    assert transform.resize_to == 256  # int(224 / 0.875)
    resized = img.resize((384, 256), BICUBIC)  # shorter side 256, longer int(256 * 300 / 200)
    expected = resized.crop((80, 16, 304, 240))  # round((384 - 224) / 2), round((256 - 224) / 2)
    assert torch.equal(transform(img), to_normalized_tensor(expected, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    assert build_eval_transform(224, crop_pct=1.0).resize_to == 224
    assert build_eval_transform(384)(img).shape == (3, 384, 384)  # warped, not cropped
    with pytest.raises(UserError, match="--crop_pct"):
        build_eval_transform(224, crop_pct=1.5)


def test_eval_transform_at_32_px_neither_resizes_nor_crops():
    img = real_images()[0]
    assert torch.equal(build_eval_transform(32)(img), to_normalized_tensor(img, IMAGENET_DEFAULT_MEAN,
                                                                           IMAGENET_DEFAULT_STD))
    with pytest.raises(ValueError, match="must be 32x32"):
        build_eval_transform(32)(real_images()[2])


def test_seeds_separate_samples_epochs_and_batches():
    from alphadecay.vit.transforms import batch_rng

    draws = {sample_rng(0, 0, 0).random(), sample_rng(0, 0, 1).random(), sample_rng(0, 1, 0).random(),
             batch_rng(0, 0, 0, 0).random()}
    assert len(draws) == 4
    assert sample_rng(5, 2, 9).random() == sample_rng(5, 2, 9).random()


def test_bad_flags_are_user_errors():
    with pytest.raises(UserError, match="--train_interpolation nearest"):
        build_train_transform(224, train_interpolation="nearest")
    with pytest.raises(UserError, match="--reprob"):
        build_train_transform(224, reprob=1.5)
    with pytest.raises(UserError, match="--aa v0"):
        build_train_transform(224, aa="v0")


def test_fill_is_the_mean_as_uint8():
    assert tuple(min(255, round(255 * m)) for m in IMAGENET_DEFAULT_MEAN) == FILL
    assert build_train_transform(224).rand_augment.fill == FILL
    assert math.isclose(IMAGENET_DEFAULT_STD[0], 0.229)
