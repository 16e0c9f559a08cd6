"""The shipped digits sample (`data/digits_sample`) and `scripts/build_digits_sample.py`. CPU, a few seconds;
the byte-identical rebuild needs scikit-learn's data file (skipped, with the reason, without it)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "digits_sample"


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_digits_sample", ROOT / "scripts" / "build_digits_sample.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = load_build_script()


def test_shipped_sample_layout_counts_and_sizes():
    counts = {split: [len(list((SAMPLE / split / str(d)).glob("*.png"))) for d in range(10)]
              for split in ("train", "val")}
    assert sorted(p.name for p in (SAMPLE / "train").iterdir()) == [str(d) for d in range(10)]
    assert sorted(p.name for p in (SAMPLE / "val").iterdir()) == [str(d) for d in range(10)]
    assert (sum(counts["train"]), sum(counts["val"])) == (1442, 355)
    assert min(counts["train"]) >= 130 and min(counts["val"]) >= 30  # every class in both splits, balanced
    files = sorted(SAMPLE.rglob("*.png"))
    assert len(files) == 1797
    assert len({f.name for f in files}) == 1797  # each row once, in one split
    assert sum(f.stat().st_size for f in files) < 2_000_000
    for path in files[::37]:
        with Image.open(path) as img:
            assert (img.format, img.size, img.mode) == ("PNG", (32, 32), "RGB")
            r, g, b = img.split()
            assert r.tobytes() == g.tobytes() == b.tobytes()  # grayscale copied to RGB
    readme = (SAMPLE / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.24432/C50P49" in readme and "build_digits_sample.py" in readme


def test_every_fifth_image_of_a_class_is_a_val_image():
    labels = np.array([3, 3, 1, 3, 3, 3, 1, 1, 1, 1, 3])
    assert build.splits(labels) == ["train", "train", "train", "train", "train", "val",
                                    "train", "train", "train", "val", "train"]


def test_to_image_scales_and_upsamples_by_blocks():
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) % 17
    img = build.to_image(pixels)
    assert img.size == (32, 32) and img.mode == "RGB"
    array = np.asarray(img)[:, :, 0]
    expected = np.rint(pixels.astype(np.float64) * 255 / 16).astype(np.uint8)
    assert np.array_equal(array[::4, ::4], expected)
    assert np.array_equal(array, np.kron(expected, np.ones((4, 4), dtype=np.uint8)))


@pytest.mark.skipif(build.sklearn_digits_csv() is None,
                    reason="scikit-learn is not installed: its digits.csv.gz is the build input "
                           "(pip install scikit-learn==1.9.1)")
def test_rebuild_is_byte_identical(tmp_path):
    counts = build.build(build.sklearn_digits_csv(), tmp_path)
    assert counts == {"train": 1442, "val": 355}

    def digests(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.png")}

    assert digests(tmp_path) == digests(SAMPLE)


def test_builder_without_input_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(build, "sklearn_digits_csv", lambda: None)
    assert build.main(["--out", str(tmp_path)]) == 2
    assert "pip install scikit-learn==1.9.1" in capsys.readouterr().err
