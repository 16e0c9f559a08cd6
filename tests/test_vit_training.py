"""vit_main.py end to end on a few of the shipped digits: exact resume after a stop signal, 2-process DDP against
one process with 2 micro-batches, the EMA inside the loop, the learning-rate floor, and every bad input."""

import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from alphadecay import dist
from alphadecay.optim import make_optimizer
from alphadecay.wd.groups import module_param_groups
from alphadecay.wd.scheduler import from_flags
from alphadecay.vit.config import parse_vit_args
from alphadecay.vit.data import TrainOrder, TrainSamples, load_batches, load_image_folders
from alphadecay.vit.mixup import build_criterion
from alphadecay.vit.model import build_vit
from alphadecay.vit.train import ViTTrainer
from alphadecay.vit.transforms import build_train_transform
from tests.conftest import REPO, by_step, free_port, read_metrics, run_vit, vit_args


def weights(run_dir, step, stem="model"):
    return load_file(run_dir / f"model_{step}" / f"{stem}.safetensors")


def test_resume_after_a_stop_signal_gives_the_same_run(digits_subset, tmp_path, monkeypatch):
    """Full official augmentation (RandAugment, Mixup/CutMix, random erasing), drop path, EMA and AlphaDecay's pass at
    every epoch start; stopped by SIGTERM in the middle of epoch 2, resumed: every logged number and the final
    weights, EMA and decays equal the uninterrupted run's, bit for bit (float32, CPU)."""
    flags = dict(epochs=3, drop_path=0.1, model_ema="true", model_ema_decay=0.9, model_ema_eval="true",
                 wd_scheduler="alphadecay", weight_decay=1e-3)
    assert run_vit(vit_args(digits_subset, tmp_path / "straight", **flags)) == 0

    update = ViTTrainer.update

    def update_then_signal(self, micro_batches):
        result = update(self, micro_batches)
        if self.wd_scheduler.update == 15:  # after the 5th update of epoch 2: the 6th update's all-reduce carries it
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(ViTTrainer, "update", update_then_signal)
    assert run_vit(vit_args(digits_subset, tmp_path / "stopped", **flags)) == 0
    assert sorted(p.name for p in (tmp_path / "stopped").glob("model_*")) == ["model_10", "model_16"]
    monkeypatch.setattr(ViTTrainer, "update", update)
    assert run_vit(vit_args(digits_subset, tmp_path / "stopped", auto_resume="true", **flags)) == 0

    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "stopped")
    for key in ("loss", "lr", "weight_decay", "top1", "ema_top1", "eval_loss", "ema_eval_loss",
                "alpha/blocks.2.mlp.fc1", "wd/blocks.0.attn.qkv"):
        assert by_step(resumed, key) == by_step(straight, key), key
    assert sorted(by_step(straight, "alpha/blocks.2.mlp.fc1")) == [1, 11, 21]  # one pass per epoch
    for stem in ("model", "model_ema"):
        a, b = weights(tmp_path / "straight", 30, stem), weights(tmp_path / "stopped", 30, stem)
        assert all(torch.equal(a[k], b[k]) for k in a), stem
    state = [torch.load(p / "model_30" / "training_state.pt", weights_only=False)
             for p in (tmp_path / "straight", tmp_path / "stopped")]
    assert [g["weight_decay"] for g in state[0]["optimizer"]["param_groups"]] == \
        [g["weight_decay"] for g in state[1]["optimizer"]["param_groups"]]
    assert state[0]["wd_scheduler"] == state[1]["wd_scheduler"]


def one_update(data_path, info, *, update_freq):
    """One AdaDecay update (its decays come from the reduced gradients) of the float64 CPU-sized ViT, on rank
    info.rank's share of the first global batch of 8 shipped digits (4 per micro-batch), full per-image
    augmentation, Mixup/CutMix off; returns (global mean loss, weights)."""
    config, _ = parse_vit_args(vit_args(data_path, None, batch_size=4, mixup=0, cutmix=0, wd_scheduler="adadecay",
                                        weight_decay=1e-2, lr=1e-2))
    train, _ = load_image_folders(data_path)
    samples = TrainSamples(train, build_train_transform(32), seed=0)
    order = TrainOrder(len(train), batch_size=4, world_size=info.world_size, seed=0)
    keys = [[(0, int(i)) for i in batch] for _, batch in zip(range(update_freq), order.batches(0, info.rank))]
    micro = [(images.double(), targets) for images, targets in load_batches(samples, keys)]
    torch.manual_seed(0)
    raw = build_vit("vit_tiny_patch4_32", num_classes=10, img_size=32).double()
    model = torch.nn.parallel.DistributedDataParallel(raw) if info.distributed else raw
    groups = module_param_groups(raw, config.weight_decay)
    optimizer = make_optimizer(groups, name="adam", lr=config.lr, betas=(0.9, 0.999), eps=1e-8, impl="official",
                               device=info.device)
    scheduler = from_flags(config, raw, optimizer, timing="vit", updates_per_epoch=10)
    trainer = ViTTrainer.for_updates(config, info, model, raw, optimizer, scheduler,
                                     build_criterion(mixup_active=False, smoothing=config.smoothing))
    outcome = trainer.update(micro)
    assert outcome.wd_metrics["wd_tuned_modules"] == 16
    loss = outcome.loss_sum / (update_freq * info.world_size)  # summed over ranks
    return loss, {k: v.detach().clone() for k, v in raw.state_dict().items()}


def _ddp_worker(rank, port, data_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    loss, params = one_update(data_path, info, update_freq=1)
    torch.save({"loss": loss, "params": params}, os.path.join(out, f"rank{rank}.pt"))
    torch_dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_with_two_micro_batches(digits_subset, tmp_path):
    """2 gloo processes x 4 images = 1 process x 2 micro-batches of 4: the same 8 images (the global batch is a
    contiguous slice of the epoch's permutation however it is split), the same gradient of the global mean loss,
    hence the same AdaDecay decays and the same update (float64)."""
    mp.spawn(_ddp_worker, args=(free_port(), str(digits_subset), str(tmp_path)), nprocs=2, join=True)
    cpu = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    loss, params = one_update(str(digits_subset), cpu, update_freq=2)
    torch.manual_seed(0)
    init = build_vit("vit_tiny_patch4_32", num_classes=10, img_size=32).double().state_dict()
    assert not torch.allclose(params["blocks.0.mlp.fc1.weight"], init["blocks.0.mlp.fc1.weight"])
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["loss"] == pytest.approx(loss, rel=1e-12)
        for key in params:
            torch.testing.assert_close(result["params"][key], params[key], rtol=1e-10, atol=1e-12)


def test_torchrun_two_processes_train_as_one_process_with_two_micro_batches(digits_subset, tmp_path):
    """The same through vit_main.py under torchrun, 2 epochs in float32 with evaluation and EMA: every logged loss
    agrees to float32 summation order (Adam turns those last-bit differences into weight differences of a
    fraction of one step, so weights are compared by the float64 test above)."""
    flags = dict(batch_size=4, mixup=0, cutmix=0, wd_scheduler="alphadecay", weight_decay=1e-3, model_ema="true",
                 model_ema_decay=0.9, model_ema_eval="true")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", str(REPO / "vit_main.py")]
    done = subprocess.run(launcher + vit_args(digits_subset, tmp_path / "ddp", **flags), cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FutureWarning" not in done.stderr  # DDP is built with what torch 2.13 asks for (no broadcast_buffers)
    assert run_vit(vit_args(digits_subset, tmp_path / "one", update_freq=2, **flags)) == 0
    ddp, one = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "one")
    assert sorted(by_step(ddp, "loss")) == list(range(1, 21)) and ddp[0]["provenance"]["world_size"] == 2
    for key in ("loss", "eval_loss", "ema_eval_loss", "alpha/blocks.1.attn.proj"):
        a, b = by_step(ddp, key), by_step(one, key)
        assert sorted(a) == sorted(b) and all(a[s] == pytest.approx(b[s], rel=1e-4) for s in a), key
    assert sorted(p.name for p in (tmp_path / "ddp").glob("model_*")) == ["model_10", "model_20"]


def test_decoding_workers_give_the_same_run(digits_subset, tmp_path):
    """--num_workers only moves the decoding and augmentation to worker processes: every draw is keyed by the image
    (and Mixup's by the micro-batch), so the run is the same."""
    for workers in (0, 2):
        assert run_vit(vit_args(digits_subset, tmp_path / str(workers), epochs=1, num_workers=workers)) == 0
    a, b = read_metrics(tmp_path / "0"), read_metrics(tmp_path / "2")
    assert by_step(a, "loss") == by_step(b, "loss") and by_step(a, "top1") == by_step(b, "top1")


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_the_ema_follows_every_update(digits_subset, tmp_path, decay):
    """Decay 0: the EMA is the model after the last update; decay 1: it is still the initialisation (seed 0)."""
    assert run_vit(vit_args(digits_subset, tmp_path, epochs=1, model_ema="true", model_ema_decay=decay,
                            model_ema_eval="true")) == 0
    ema, model = weights(tmp_path, 10, "model_ema"), weights(tmp_path, 10)
    torch.manual_seed(0)
    init = build_vit("vit_tiny_patch4_32", num_classes=10, img_size=32).state_dict()
    expected = model if decay == 0.0 else init
    assert all(torch.equal(ema[k], expected[k]) for k in ema)
    assert not torch.equal(model["head.weight"], init["head.weight"])
    evaluation = next(e for e in read_metrics(tmp_path) if "ema_top1" in e)
    if decay == 0.0:
        assert evaluation["ema_top1"] == evaluation["top1"] and evaluation["ema_eval_loss"] == evaluation["eval_loss"]


def test_eval_only_reproduces_a_checkpoints_evaluation_and_writes_nothing(digits_subset, tmp_path, capsys):
    assert run_vit(vit_args(digits_subset, tmp_path, model_ema="true", model_ema_decay=0.5, model_ema_eval="true")) == 0
    logged = next(e for e in read_metrics(tmp_path) if e["step"] == 10 and "top1" in e)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert run_vit(vit_args(digits_subset, tmp_path, model_ema="true", model_ema_eval="true", eval="true",
                            resume=tmp_path / "model_10")) == 0
    printed = capsys.readouterr().out
    assert (f"epoch 1 (update 10): top-1 {logged['top1']:.2f}%, top-5 {logged['top5']:.2f}%, loss "
            f"{logged['eval_loss']:.4f} on 20 val images; EMA top-1 {logged['ema_top1']:.2f}%") in printed
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_min_lr_is_a_ratio_by_default_and_absolute_with_the_switch(digits_subset, tmp_path):
    official, _ = parse_vit_args(["--data_path", "x"])
    assert official.lr * official.min_lr_ratio() == pytest.approx(4e-9)  # 4e-3 x 1e-6, as the official code
    absolute, _ = parse_vit_args(["--data_path", "x", "--min_lr_absolute"])
    assert absolute.lr * absolute.min_lr_ratio() == pytest.approx(1e-6)
    assert run_vit(vit_args(digits_subset, tmp_path, epochs=1, warmup_epochs=0, min_lr=0.5)) == 0
    lr = by_step(read_metrics(tmp_path), "lr")
    assert lr[1] == 2e-3 and lr[10] == pytest.approx(1e-3 + 1e-3 * 0.5 * (1 + math.cos(0.9 * math.pi)))  # update 9


# -- bad input: one paragraph, exit code 2, before any training ------------------------------------------------
def broken_copy(src, dst, change):
    shutil.copytree(src, dst)
    change(dst)
    return dst


@pytest.mark.parametrize("case,needle", [
    ("no_splits", "has no train/ and no val/ folder"),
    ("classes_differ", "train/ and val/ must have the same class folders (train has 10, val 9); only in train/: 7"),
    ("unreadable", "1 image(s) cannot be read: "),
    ("unknown_model", "--model vit_huge_patch14: unknown model. Valid: vit_deit_tiny_patch16_224"),
    ("two_methods", "--wd_scheduler uniform contradicts --use_modulewise_wd"),
    ("awd_and_modulewise", "select two different weight-decay methods"),
    ("odd_batch_with_mixup", "--batch_size 7: Mixup/CutMix pairs each image with its mirror"),
    ("batch_too_large", "80 training images give no full batch of --batch_size 128"),
    ("too_few_outputs", "--nb_classes 5: --data_path"),
    ("input_size", "--input_size 30: vit_tiny_patch4_32 cuts images into 4x4 patches"),
    ("bad_policy", "--aa"),
    ("no_data_path", "--data_path is required"),
    ("unknown_flag", "unknown flag(s): --epoch (did you mean --epochs"),
])
def test_bad_input_is_one_clear_error_before_training(digits_subset, tmp_path, capsys, case, needle):
    data, extra = digits_subset, {}
    if case == "no_splits":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "classes_differ":
        data = broken_copy(digits_subset, tmp_path / "data", lambda d: shutil.rmtree(d / "val" / "7"))
    elif case == "unreadable":
        data = broken_copy(digits_subset, tmp_path / "data",
                           lambda d: (d / "train" / "3" / "broken.png").write_bytes(b"not a png"))
        needle += str(data / "train" / "3" / "broken.png")
    else:
        extra = {"unknown_model": {"model": "vit_huge_patch14"},
                 "two_methods": {"wd_scheduler": "uniform", "use_modulewise_wd": True},
                 "awd_and_modulewise": {"use_AWD_NeurIPS2023": True, "use_modulewise_wd": True},
                 "odd_batch_with_mixup": {"batch_size": 7},
                 "batch_too_large": {"batch_size": 128},
                 "too_few_outputs": {"nb_classes": 5},
                 "input_size": {"input_size": 30},
                 "bad_policy": {"aa": "rand-m9-x3"},
                 "unknown_flag": {"epoch": 3}}.get(case, {})
    args = vit_args(data, tmp_path / "run", **extra)
    if case == "no_data_path":
        args = args[:args.index("--data_path")] + args[args.index("--data_path") + 2:]
    assert run_vit(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_directory_with_checkpoints_is_not_overwritten(digits_subset, tmp_path, capsys):
    assert run_vit(vit_args(digits_subset, tmp_path, epochs=1)) == 0
    assert run_vit(vit_args(digits_subset, tmp_path, epochs=1)) == 2
    assert f"--output_dir {tmp_path} already holds checkpoints (model_10)" in capsys.readouterr().err


def test_user_errors_print_no_traceback(digits_subset, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "vit_main.py"), *vit_args(digits_subset, tmp_path, model="nope")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: --model nope: unknown model")
    assert "Traceback" not in done.stderr
