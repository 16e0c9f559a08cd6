"""alphadecay.vit.data: the ImageFolder reader and its errors, unreadable images, the training order (against
torch's DistributedSampler), exact evaluation shards and top-k counts, deterministic sample loading. CPU, seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from alphadecay.errors import UserError
from alphadecay.vit.data import (EvalSamples, TrainOrder, TrainSamples, eval_indices, find_unreadable,
                                 load_batches, load_image_folders, scan_image_folder, topk_correct, unreadable_error)
from alphadecay.vit.transforms import build_eval_transform, build_train_transform

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "digits_sample"


def write_image(path: Path, color=(10, 20, 30), size=(32, 32), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def make_tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    for split, classes in layout.items():
        for name, count in classes.items():
            for i in range(count):
                write_image(root / split / name / f"img{i}.png", color=(i, i, i))
    return root


def test_classes_sorted_and_files_walked_like_torchvision(tmp_path):
    root = tmp_path / "train"
    write_image(root / "b" / "z.PNG")
    write_image(root / "b" / "a.jpg")
    write_image(root / "b" / "sub" / "c.png")
    write_image(root / "a" / "x.bmp")
    (root / "a" / "notes.txt").write_text("not an image")
    folder = scan_image_folder(str(root))
    assert folder.classes == ("a", "b")
    names = [Path(p).relative_to(root).as_posix() for p in folder.paths]
    assert names == ["a/x.bmp", "b/a.jpg", "b/z.PNG", "b/sub/c.png"]
    assert folder.targets.tolist() == [0, 1, 1, 1] and folder.num_classes == 2
    img = folder.load(0)
    assert img.mode == "RGB" and img.size == (32, 32)


def test_reads_the_shipped_sample():
    train, val = load_image_folders(str(SAMPLE))
    assert train.classes == val.classes == tuple(str(d) for d in range(10))
    assert (len(train), len(val)) == (1442, 355)
    assert np.bincount(val.targets).tolist() == [len(list((SAMPLE / "val" / str(d)).glob("*.png"))) for d in range(10)]


def test_grayscale_images_load_as_rgb(tmp_path):
    write_image(tmp_path / "c" / "g.png", color=(77,), mode="L")
    img = scan_image_folder(str(tmp_path)).load(0)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("layout, message", [
    ({}, "no train/ and no val/ folder"),
    ({"train": {"a": 1}}, "no val/ folder"),
    ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, "only in train/: b; only in val/: c"),
    ({"train": {"a": 1, "b": 0}, "val": {"a": 1}}, r"class folder\(s\) b in .*train hold no images"),
])
def test_bad_data_path_layouts(tmp_path, layout, message):
    root = make_tree(tmp_path / "data", layout)
    root.mkdir(exist_ok=True)
    for split, classes in layout.items():
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
    with pytest.raises(UserError, match=message) as err:
        load_image_folders(str(root))
    assert str(root) in str(err.value) and "--data_path" in str(err.value)


def test_missing_data_path_and_empty_split(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_image_folders(str(tmp_path / "nowhere"))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="has no class folders; expected the ImageNet layout"):
        load_image_folders(str(tmp_path))


def test_unreadable_images_are_found_up_front_and_named(tmp_path):
    root = make_tree(tmp_path, {"train": {"a": 3}, "val": {"a": 1}})
    (root / "train" / "a" / "garbage.png").write_bytes(b"this is not a png")
    (root / "train" / "a" / "empty.jpg").write_bytes(b"")
    good = (root / "train" / "a" / "img0.png").read_bytes()
    (root / "train" / "a" / "truncated.png").write_bytes(good[:len(good) // 2])  # header intact, data cut
    train, _ = load_image_folders(str(root))
    bad = find_unreadable(train)
    assert sorted(Path(m.split(" (")[0]).name for m in bad) == ["empty.jpg", "garbage.png"]
    assert len(find_unreadable(train, decode=True)) == 3  # decoding also catches the truncated one
    message = str(unreadable_error(bad, str(root)))
    assert message.startswith(f"--data_path {root}: 2 image(s) cannot be read:") and "garbage.png" in message
    index = next(i for i, p in enumerate(train.paths) if p.endswith("truncated.png"))
    with pytest.raises(UserError, match="cannot decode image .*truncated.png"):
        train.load(index)
    shares = [find_unreadable(train, range(r, len(train), 2)) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(bad)  # ranks can split the check


@pytest.mark.parametrize("n, world, batch", [(103, 1, 8), (103, 2, 8), (100, 4, 5), (1000, 3, 32)])
def test_train_order_matches_torch_distributed_sampler_batches(n, world, batch):
    """The official code: DistributedSampler(shuffle=True, seed) + DataLoader(drop_last=True)."""
    order = TrainOrder(n, batch_size=batch, world_size=world, seed=3)
    for epoch in (0, 1):
        shares = []
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
            sampler.set_epoch(epoch)
            official = list(sampler)
            ours = np.concatenate(list(order.batches(epoch, rank)))
            assert ours.tolist() == official[:order.steps_per_epoch * batch]
            shares.append(order.rank_indices(epoch, rank))
        union = np.concatenate(shares)
        assert len(set(union.tolist())) == len(union) == (n // world) * world  # disjoint


def test_train_order_resumes_at_any_step_and_reshuffles_each_epoch():
    order = TrainOrder(200, batch_size=16, world_size=2, seed=0)
    full = [b.tolist() for b in order.batches(4, rank=1)]
    assert len(full) == order.steps_per_epoch == 6
    assert [b.tolist() for b in order.batches(4, rank=1, start_step=4)] == full[4:]
    assert order.permutation(4).tolist() != order.permutation(5).tolist()
    with pytest.raises(UserError, match="--batch_size 64"):
        TrainOrder(100, batch_size=64, world_size=2, seed=0)


def test_eval_shards_cover_every_sample_once_and_counts_sum_exactly():
    n, world = 11, 3
    shards = [eval_indices(n, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(n, 7, generator=g), torch.randint(0, 7, (n,), generator=g)
    total = topk_correct(logits, target)
    parts = [topk_correct(logits[s], target[s]) for s in shards]
    assert [sum(p[k] for p in parts) for k in range(2)] == total


def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 1])  # first, third and second in their rows
    assert topk_correct(logits, target, ks=(1, 2, 5)) == [1, 2, 3]  # k capped at the 3 classes


def test_train_samples_are_a_function_of_seed_epoch_and_index():
    train, val = load_image_folders(str(SAMPLE))
    samples = TrainSamples(train, build_train_transform(32), seed=0)
    a, target = samples[(2, 10)]
    assert a.shape == (3, 32, 32) and target == int(train.targets[10])
    assert torch.equal(a, samples[(2, 10)][0])
    assert not torch.equal(a, samples[(3, 10)][0])
    order = TrainOrder(len(train), batch_size=4, world_size=1, seed=0)
    keys = [[(1, int(i)) for i in b] for b in list(order.batches(1, 0))[:3]]
    serial = list(load_batches(samples, keys))
    parallel = list(load_batches(samples, keys, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for (x1, y1), (x2, y2) in zip(serial, parallel):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and y1.dtype == torch.int64


def test_eval_samples_and_wrong_sizes(tmp_path):
    _, val = load_image_folders(str(SAMPLE))
    x, y = next(load_batches(EvalSamples(val, build_eval_transform(32)), [list(range(5))]))
    assert x.shape == (5, 3, 32, 32) and y.tolist() == val.targets[:5].tolist()
    write_image(tmp_path / "c" / "big.png", size=(40, 40))
    folder = scan_image_folder(str(tmp_path))
    with pytest.raises(UserError, match="big.png: a 40x40 image at --input_size 32"):
        EvalSamples(folder, build_eval_transform(32))[0]
