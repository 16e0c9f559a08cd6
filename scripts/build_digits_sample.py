#!/usr/bin/env python3
"""Rebuild the shipped real-image sample `data/digits_sample/` (ImageFolder layout) for the ViT's CPU demo and tests.

Source: the 1,797 handwritten digits (10 classes, 8x8 pixels, values 0..16) that scikit-learn bundles as
`sklearn/datasets/data/digits.csv.gz`: the test set of the UCI "Optical Recognition of Handwritten Digits" data
set (E. Alpaydin, C. Kaynak, 1998), licensed CC BY 4.0. Each row is 64 pixel values, then the label.

scikit-learn is needed only here, for that one file, and is not a dependency of alphadecay:

    .venv/bin/pip install scikit-learn==1.9.1
    .venv/bin/python scripts/build_digits_sample.py            # writes data/digits_sample/{train,val}/<digit>/

(`--digits_csv PATH` reads the file from elsewhere, e.g. unzipped from `pip download scikit-learn==1.9.1 --no-deps`.)
sklearn is located, not imported (so scipy and friends are not needed either).

Each image: pixel values scaled to 0..255 (v * 255 / 16, rounded), upsampled 8 -> 32 px by nearest neighbour (each
source pixel a 4x4 block: no invented detail, and 0.4 MB in all where bicubic takes 2.5 MB), grayscale copied to
RGB, saved as PNG (compression level 9, no metadata). Split, per class in row order: every 5th image of a class
(its 5th, 10th, ...) goes to val/, the rest to train/ (1,442 / 355, about 20% of each class), file name
`<row index, 4 digits>.png`. The output is byte-identical for the same input file and Pillow/zlib versions; the
old split folders are replaced.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "digits_sample"
SIZE = 32
VAL_EVERY = 5  # every 5th image of each class is a val image


def sklearn_digits_csv() -> Path | None:
    """sklearn's bundled digits file, found without importing sklearn; None when sklearn is not installed."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def read_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 8, 8) with values 0..16, labels int64 (N,)) from digits.csv.gz."""
    with gzip.open(path, "rt") as handle:
        rows = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    if rows.shape[1] != 65 or rows[:, :64].min() < 0 or rows[:, :64].max() > 16:
        raise ValueError(f"{path}: expected rows of 64 pixel values in 0..16 and a label")
    return rows[:, :64].reshape(-1, 8, 8).astype(np.uint8), rows[:, 64]


def to_image(pixels: np.ndarray, size: int = SIZE) -> Image.Image:
    """An 8x8 0..16 digit as a size x size RGB image (nearest-neighbour upsampling of the 0..255 grayscale)."""
    gray = np.rint(pixels.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.NEAREST).convert("RGB")


def splits(labels: np.ndarray) -> list[str]:
    """"train" or "val" per row: the k-th image of its class (k = 1, 2, ...) is a val image when k % 5 == 0."""
    seen: dict[int, int] = {}
    out = []
    for label in labels.tolist():
        seen[label] = seen.get(label, 0) + 1
        out.append("val" if seen[label] % VAL_EVERY == 0 else "train")
    return out


def build(csv_path: Path, out: Path) -> dict[str, int]:
    """Write the sample under `out`; returns the image count per split."""
    images, labels = read_digits(csv_path)
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
    counts = {"train": 0, "val": 0}
    for row, (pixels, label, split) in enumerate(zip(images, labels, splits(labels))):
        folder = out / split / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        to_image(pixels).save(folder / f"{row:04d}.png", format="PNG", compress_level=9)
        counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits_csv", type=Path, default=None,
                        help="digits.csv.gz (default: the one inside an installed scikit-learn)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    csv_path = args.digits_csv or sklearn_digits_csv()
    if csv_path is None or not csv_path.is_file():
        print("error: digits.csv.gz not found. Install scikit-learn (`.venv/bin/pip install scikit-learn==1.9.1`) "
              "or pass --digits_csv PATH.", file=sys.stderr)
        return 2
    counts = build(csv_path, args.out)
    size = sum(f.stat().st_size for f in args.out.rglob("*.png"))
    print(f"{os.path.relpath(args.out)}: {counts['train']} train + {counts['val']} val images, {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
