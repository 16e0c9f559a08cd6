"""ImageFolder data for the ViT: `--data_path` with `train/` and `val/` class folders, the training order across
ranks, exact evaluation shards, and batch loading. PIL decodes; no torchvision.

Layout (ImageNet's, the official `--data_set IMNET`): DATA/train/<class>/<image> and DATA/val/<class>/<image>,
the same class folder names in both. Classes are the sorted folder names (index = position); a class's images are
found by walking its folder (following links) in sorted order and keeping the extensions torchvision's ImageFolder
keeps, so sample i is the same file as in the official code.

Unreadable images are an ERROR, not skipped: the paper's numbers are top-1 over all 50,000 ImageNet val images and
the training order is a permutation of the file list, so a silently skipped file would change what is measured and
which images every later step sees (and its resume position). `find_unreadable` opens every file's header (or
decodes it fully) before training, so a bad file is reported with its path before any compute; a file whose header
is fine but whose pixel data is broken raises a UserError naming it when it is first decoded.

Training order (`TrainOrder`): epoch e is `torch.randperm(N)` seeded with seed + e, exactly as torch's
DistributedSampler(shuffle=True, seed) in the official code; it is cut to a multiple of the world size W and rank r
takes positions r, r+W, r+2W, ...: disjoint shares (the official sampler pads with repeats instead; those repeats
land only in the last, incomplete batch, which the official DataLoader drops too, so the batches are the same).
Each rank's share is cut into batches of `batch_size`, the incomplete tail dropped. A run resumes at (epoch, step).

Evaluation (`eval_indices`): rank r takes r, r+W, ...; every image is evaluated exactly once, so summing the
correct counts (`topk_correct`) and the sample counts over ranks gives the exact global accuracy. (The official
DistributedSampler pads the val set with repeats when W does not divide it.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from alphadecay.errors import UserError
from alphadecay.vit.transforms import EvalTransform, TrainTransform, sample_rng

# torchvision.datasets.folder.IMG_EXTENSIONS (matched case-insensitively)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT_HINT = ("expected the ImageNet layout: DIR/train/<class>/<image> and DIR/val/<class>/<image>, the same class "
               "folder names in both, images ending in " + " ".join(IMG_EXTENSIONS))


@dataclass(frozen=True, eq=False)  # compared by identity (it holds an array)
class ImageFolder:
    """One split: `paths[i]` is sample i, `targets[i]` its class index into `classes`."""

    root: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    targets: np.ndarray  # int64, len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def load(self, index: int) -> Image.Image:
        """Sample `index` decoded as RGB (grayscale and palette images are converted, as torchvision's loader)."""
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise UserError(f"cannot decode image {path} ({err}). Remove or replace the file; images are never "
                            "skipped, since that would change the dataset being measured.") from None


def scan_image_folder(root: str) -> ImageFolder:
    """Class folders of `root` (sorted) and their images (sorted walk), or a UserError that says what is wrong."""
    if not os.path.isdir(root):
        raise UserError(f"--data_path: {root} is not a directory; {LAYOUT_HINT}.")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise UserError(f"--data_path: {root} has no class folders; {LAYOUT_HINT}.")
    paths: list[str] = []
    targets: list[int] = []
    empty = []
    for index, name in enumerate(classes):
        before = len(paths)
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(dirpath, filename))
        targets += [index] * (len(paths) - before)
        if len(paths) == before:
            empty.append(name)
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserError(f"--data_path: class folder(s) {shown} in {root} hold no images; {LAYOUT_HINT}.")
    return ImageFolder(root=root, classes=tuple(classes), paths=tuple(paths), targets=np.asarray(targets, np.int64))


def load_image_folders(data_path: str) -> tuple[ImageFolder, ImageFolder]:
    """(train, val) of `--data_path`, checked: both splits exist, hold images and have the same classes."""
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path}: no such directory; {LAYOUT_HINT}.")
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(data_path, s))]
    if missing:
        raise UserError(f"--data_path {data_path} has no {' and no '.join(s + '/' for s in missing)} folder; "
                        f"{LAYOUT_HINT}.")
    train = scan_image_folder(os.path.join(data_path, "train"))
    val = scan_image_folder(os.path.join(data_path, "val"))
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))

        def names(xs: list[str]) -> str:
            return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "") if xs else "none"

        raise UserError(f"--data_path {data_path}: train/ and val/ must have the same class folders "
                        f"(train has {len(train.classes)}, val {len(val.classes)}); only in train/: "
                        f"{names(only_train)}; only in val/: {names(only_val)}.")
    return train, val


def _unreadable(path: str, decode: bool) -> str | None:
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return f"{path} ({err})"
    return None


def find_unreadable(folder: ImageFolder, indices: Iterable[int] | None = None, *, decode: bool = False,
                    threads: int = 8) -> list[str]:
    """'path (reason)' for every image among `indices` (default all) that PIL cannot open; `decode` also decodes
    the pixels (slower; catches truncated data). Threads, since this is file I/O. Ranks can split the work
    (`indices=range(rank, len(folder), world_size)`) and gather the lists."""
    chosen = list(range(len(folder))) if indices is None else [int(i) for i in indices]
    chunks = [chosen[i:i + 512] for i in range(0, len(chosen), 512)]  # a few thousand tasks even for ImageNet

    def check(chunk: list[int]) -> list[str]:
        return [m for m in (_unreadable(folder.paths[i], decode) for i in chunk) if m is not None]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [message for found in pool.map(check, chunks) for message in found]


def unreadable_error(messages: Sequence[str], data_path: str) -> UserError:
    """The one-paragraph error for `find_unreadable`'s findings (the first 10 named, then a count)."""
    shown = "; ".join(messages[:10]) + (f"; and {len(messages) - 10} more" if len(messages) > 10 else "")
    return UserError(f"--data_path {data_path}: {len(messages)} image(s) cannot be read: {shown}. Remove or replace "
                     "them; images are never skipped, since that would change the dataset being measured.")


# ------------------------------------------------------------------------------------------------------------
# Which samples each rank sees
# ------------------------------------------------------------------------------------------------------------
class TrainOrder:
    """Per-epoch shuffled, disjoint per-rank shares, cut into batches; see the module docstring."""

    def __init__(self, num_samples: int, *, batch_size: int, world_size: int, seed: int) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be positive")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.per_rank = num_samples // world_size
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{num_samples} training images give no full batch of --batch_size {batch_size} on each "
                            f"of {world_size} process(es); lower --batch_size or add images.")

    def permutation(self, epoch: int) -> np.ndarray:
        """All sample indices in epoch `epoch`'s order (torch's DistributedSampler permutation)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).numpy()

    def rank_indices(self, epoch: int, rank: int) -> np.ndarray:
        """Rank `rank`'s share of the epoch, in order (`per_rank` indices)."""
        return self.permutation(epoch)[: self.per_rank * self.world_size][rank::self.world_size]

    def batches(self, epoch: int, rank: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Rank `rank`'s batches of `epoch` from step `start_step` on (a resumed run passes the next step)."""
        share = self.rank_indices(epoch, rank)
        for step in range(start_step, self.steps_per_epoch):
            yield share[step * self.batch_size:(step + 1) * self.batch_size]


def eval_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s evaluation samples: rank, rank + W, ... (every sample exactly once over all ranks)."""
    return np.arange(rank, num_samples, world_size)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[torch.Tensor]:
    """How many samples have their label among the top-k logits, for each k (k capped at the class count, as
    timm's `accuracy`), as 0-dim tensors on the logits' device (nothing is read to the host). Sum these and the
    sample counts over ranks; divide once at the end."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(target.view(-1, 1))
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


# ------------------------------------------------------------------------------------------------------------
# Samples and batches
# ------------------------------------------------------------------------------------------------------------
class TrainSamples(torch.utils.data.Dataset):
    """`dataset[(epoch, index)] -> (augmented image tensor, target)`; the augmentation is drawn from
    `sample_rng(seed, epoch, index)`, so it is the same whichever process, worker or resume computes it."""

    def __init__(self, folder: ImageFolder, transform: TrainTransform, *, seed: int) -> None:
        self.folder = folder
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        image = self.transform(self.folder.load(index), sample_rng(self.seed, epoch, index))
        return image, int(self.folder.targets[index])


class EvalSamples(torch.utils.data.Dataset):
    """`dataset[index] -> (image tensor, target)` through the deterministic eval transform."""

    def __init__(self, folder: ImageFolder, transform: EvalTransform) -> None:
        self.folder = folder
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = self.transform(self.folder.load(index))
        except ValueError as err:
            raise UserError(f"{self.folder.paths[index]}: {err}.") from None
        return image, int(self.folder.targets[index])


def collate(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, 3, H, W) float32, targets (B,) int64)."""
    return torch.stack([image for image, _ in items]), torch.tensor([target for _, target in items], dtype=torch.int64)


def load_batches(dataset: torch.utils.data.Dataset, batches: Iterable[Sequence], *, num_workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Collated batches of `dataset[key]` for each list of keys in `batches`, in order.

    Keys are (epoch, index) pairs for TrainSamples and indices for EvalSamples, e.g.
    `([(epoch, int(i)) for i in b] for b in order.batches(epoch, rank, start_step))`. With `num_workers` > 0 a
    torch DataLoader decodes in worker processes; the result is identical, because every random draw is keyed
    by the sample, not by the worker.
    """
    if num_workers == 0:
        for keys in batches:
            yield collate([dataset[key] for key in keys])
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches], num_workers=num_workers,
                                         collate_fn=collate, pin_memory=pin_memory)
    yield from loader
