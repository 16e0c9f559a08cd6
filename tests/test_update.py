"""The update loop shared by both trainers (alphadecay/update.py): one host read per update, throughput timed up to
that read, and non-finite losses or gradients stopping the run or dropping the update on every rank alike."""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import alphadecay
from alphadecay import dist, wd
from alphadecay.config import parse_args
from alphadecay.errors import RunDiverged
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.trainer import Trainer
from alphadecay.update import NonfiniteGuard, Outcome
from alphadecay.vit.config import parse_vit_args
from alphadecay.vit.mixup import build_criterion
from alphadecay.vit.model import build_vit
from alphadecay.vit.train import ViTTrainer
from tests.conftest import TINY_CONFIG, by_step, free_port, read_metrics, run_main, run_vit, train_args, vit_args

PACKAGE = str(Path(alphadecay.__file__).parent)
CPU1 = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the tensor-to-host conversions that alphadecay's own code makes (each is a host synchronisation on a
    GPU); torch's internals are not counted."""
    counts: Counter = Counter()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def llama_trainer(method="uniform", **flags):
    args = ["--model_config", TINY_CONFIG, "--optimizer", "adamw", "--lr", "1e-3", "--weight_decay", "0.1"]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    config, _ = parse_args(args)
    raw = build_model(load_model_config(TINY_CONFIG), seed=0)
    optimizer = build_optimizer(wd.module_param_groups(raw, 0.1), config, CPU1.device)
    scheduler = wd.create(method, raw, optimizer, **({"every": 100} if method == "alphadecay" else {}))
    return Trainer.for_updates(config, CPU1, raw, optimizer, scheduler)


def batch(seed=0):
    ids = torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids, "labels": ids}]


def test_an_update_reads_the_device_once(host_reads):
    """LLaMA: one .tolist() per update and no other read, with Uniform and between AlphaDecay's passes; AWD adds the
    read of ||g|| / ||w|| that its decay needs before the step (alphadecay/update.py says what else remains)."""
    for method, reads in (("uniform", {"tolist": 1}), ("alphadecay", {"tolist": 1}),
                          ("awd", {"tolist": 1, "item": 1})):
        trainer = llama_trainer(method, grad_clipping=1.0)
        trainer.train_step(batch(0))  # update 0 (AlphaDecay's pass at initialisation)
        host_reads.clear()
        for update in range(1, 4):
            outcome = trainer.train_step(batch(update))
            assert outcome.applied and outcome.finite and outcome.counts == [30.0, 32.0]
        assert dict(host_reads) == {k: 3 * v for k, v in reads.items()}, method


def test_a_vit_update_and_its_evaluation_read_the_device_once(host_reads, digits_subset):
    config, _ = parse_vit_args(vit_args(digits_subset, None))
    torch.manual_seed(0)
    raw = build_vit("vit_tiny_patch4_32", num_classes=10, img_size=32)
    optimizer = torch.optim.AdamW(wd.module_param_groups(raw, 1e-4), lr=1e-3)
    trainer = ViTTrainer.for_updates(config, CPU1, raw, raw, optimizer, wd.create("uniform", raw, optimizer),
                                     build_criterion(mixup_active=False, smoothing=0.1))
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    host_reads.clear()
    for _ in range(3):
        assert trainer.update([(images, targets)]).applied
    assert dict(host_reads) == {"tolist": 3}
    logits = raw(images)
    from alphadecay.vit.data import topk_correct

    host_reads.clear()
    top1, top5 = topk_correct(logits, targets)
    assert dict(host_reads) == {} and top5 >= top1


# -- throughput is timed up to the read ------------------------------------------------------------------------
LATE = 0.2  # seconds the mocked device needs after the host has queued an update


@pytest.fixture
def late_device(monkeypatch):
    """A device whose work completes LATE seconds after the host has queued it: the host waits in the read."""
    original = Outcome.read

    def read(self):
        if self._pending is not None:
            time.sleep(LATE)
        return original(self)

    monkeypatch.setattr(Outcome, "read", read)


def test_throughput_counts_the_time_the_device_takes(tmp_path, late_device, digits_subset):
    assert run_main(train_args(tmp_path / "llama", num_training_steps=4, log_every=1, eval_every=100,
                               save_every=100)) == 0
    metrics = read_metrics(tmp_path / "llama")
    rates = by_step(metrics, "tokens_per_s")
    assert sorted(rates) == [1, 2, 3, 4]
    for step, rate in rates.items():
        tokens = by_step(metrics, "tokens_seen")[step] - by_step(metrics, "tokens_seen").get(step - 1, 0)
        assert rate <= tokens / LATE, step  # every update's wait is inside its window
    assert run_vit(vit_args(digits_subset, tmp_path / "vit", epochs=1, log_every=1)) == 0
    rates = by_step(read_metrics(tmp_path / "vit"), "images_per_s")
    assert rates and all(rate <= 8 / LATE for rate in rates.values())  # 8 images per update


# -- non-finite losses and gradients -----------------------------------------------------------------------------
def test_a_diverging_llama_run_stops_at_the_update_saving_nothing_from_it(tmp_path, capsys):
    """The issue's reproduction: Adam at lr 1e4 gives a NaN loss within a few updates; the run used to go on,
    evaluate NaN, save NaN weights and exit 0."""
    args = train_args(tmp_path, optimizer="adam", lr=1e4, num_training_steps=20, save_every=1, eval_every=1)
    assert run_main(args) == 3
    err = capsys.readouterr().err
    event = next(m["nonfinite"] for m in read_metrics(tmp_path) if "nonfinite" in m)
    bad = event["update"]
    assert 1 < bad < 20 and event["action"] == "stop" and (event["ranks"] == [0] or not math.isfinite(
        event["grad_norm"]))
    saved = sorted(int(d.name.split("_")[1]) for d in tmp_path.iterdir() if d.name.startswith("model_"))
    assert saved and max(saved) < bad  # nothing from the bad update (or after it) was saved
    assert f"update {bad}: the" in err and f"model_{max(saved)}" in err and "--lr" in err and "Traceback" not in err
    evaluated = by_step(read_metrics(tmp_path), "eval_loss")
    assert all(math.isfinite(v) for v in evaluated.values()) and max(evaluated) < bad


def test_skip_drops_the_update_and_stops_after_too_many_in_a_row(tmp_path, capsys):
    args = train_args(tmp_path, optimizer="adam", lr=1e4, warmup_steps=0, num_training_steps=20, save_every=100,
                      eval_every=100, nonfinite="skip", max_skipped_updates=3)
    assert run_main(args) == 3
    events = [m["nonfinite"] for m in read_metrics(tmp_path) if "nonfinite" in m]
    assert [e["action"] for e in events] == ["skip", "skip", "skip", "stop"]
    assert [e["update"] for e in events] == list(range(events[0]["update"], events[0]["update"] + 4))
    assert "after 3 skipped update(s) in a row" in capsys.readouterr().err


def test_a_skipped_update_changes_neither_weights_nor_optimizer_nor_decay_schedule(monkeypatch):
    trainer = llama_trainer("alphadecay", nonfinite="skip")
    trainer.train_step(batch(0))
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    steps = [s["step"].item() for s in trainer.optimizer.state.values()]
    model_forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda *a: model_forward(*a) * math.nan)
    outcome = trainer.train_step(batch(1))
    assert not outcome.applied and not outcome.finite and outcome.nonfinite_ranks == [0]
    assert all(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())
    assert [s["step"].item() for s in trainer.optimizer.state.values()] == steps
    assert trainer.wd_scheduler.update == 2  # counted, so the passes keep their update numbers
    assert all(p.grad is None for p in trainer.raw_model.parameters())
    guard = NonfiniteGuard("skip", max_skipped=1)
    guard.check(outcome, 2, logger=None, run_dir=None)
    with pytest.raises(RunDiverged, match="after 1 skipped update"):
        guard.check(outcome, 3, logger=None, run_dir=None)


def _nan_on_rank_1(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    config, _ = parse_args(["--model_config", TINY_CONFIG, "--optimizer", "adamw", "--nonfinite", "skip"])
    raw = build_model(load_model_config(TINY_CONFIG), seed=0)
    optimizer = build_optimizer(wd.module_param_groups(raw, 0.1), config, info.device)
    trainer = Trainer.for_updates(config, info, dist.ddp(alphadecay.loss.CausalLMLoss(raw), info), optimizer,
                                  raw_model=raw)
    ids = torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(rank))
    outcomes = [trainer.train_step([{"input_ids": ids, "labels": ids}])]
    if rank == 1:  # a non-finite loss on rank 1 only
        loss_forward = trainer.model.module.forward
        trainer.model.module.forward = lambda *a: loss_forward(*a) * math.nan
    outcomes.append(trainer.train_step([{"input_ids": ids, "labels": ids}]))
    torch.save([(o.applied, o.nonfinite_ranks) for o in outcomes] + [raw.model.layers[0].mlp.up_proj.weight.sum()],
               os.path.join(out, f"rank{rank}.pt"))
    del trainer  # DDP's reducer before its process group: freed later, gloo's teardown can deadlock
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def test_two_ranks_drop_the_update_when_one_rank_diverges(tmp_path):
    mp.spawn(_nan_on_rank_1, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert first[:2] == second[:2] == [(True, []), (False, [1])]
    assert first[2] == second[2]  # the same weights on both ranks: neither applied the update


def test_a_diverging_vit_run_stops_too(tmp_path, capsys, digits_subset):
    assert run_vit(vit_args(digits_subset, tmp_path, lr=1e6, warmup_epochs=0, epochs=3)) == 3
    err = capsys.readouterr().err
    assert "not finite" in err and "--clip_grad" in err and "Traceback" not in err
    events = [m["nonfinite"] for m in read_metrics(tmp_path) if "nonfinite" in m]
    assert len(events) == 1 and events[0]["action"] == "stop"
