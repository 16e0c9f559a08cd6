"""The weight-decay methods of 2023-2025 (adamc, independent, cautious, swd) and the combinations with the paper's
module-wise methods: each against a float64 reference of its equations, through both trainers, exact resume, two
ranks = one process, the timescale rule, and the errors a user meets."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import alphadecay.wd as wd
from alphadecay import dist
from alphadecay.config import parse_args
from alphadecay.errors import UserError
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import set_learning_rate
from alphadecay.trainer import Trainer
from alphadecay.vit.config import parse_vit_args
from alphadecay.wd.groups import module_param_groups
from alphadecay.wd.registry import METHODS, WeightDecayError
from alphadecay.wd.scheduler import Scheduler
from tests.conftest import (TINY_CONFIG, by_step, free_port, read_metrics, run_main, run_vit, train_args, vit_args)

NEW = ("adamc", "independent", "cautious", "swd")
COMBINATIONS = ("alphadecay+adamc", "alphadecay+cautious")
# a decay on each method's own scale, large enough that a wrong decay shows in a few updates
DECAY = {"adamc": 0.5, "independent": 5e-3, "cautious": 0.5, "swd": 5e-4, "uniform": 0.5}
LR_FACTORS = (0.3, 0.7, 1.0, 0.8, 0.5, 0.2)  # warm-up then decay: lr_t / lr_max changes at every update


def decay_for(name: str) -> float:
    return DECAY[name.split("+")[-1]]


def options_for(name: str, peak_lr: float | None = None) -> dict:
    """A pass every 2 updates for the module-wise part; the peak lr where the method reads it."""
    options = {"every": 2} if name.startswith("alphadecay") else {}
    if peak_lr is not None and "peak_lr" in wd.registry.method(name).options:
        options["peak_lr"] = peak_lr
    return options


KERNELS = {"forloop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}  # torch's AdamW


def tiny(dtype=torch.float64, device="cpu"):
    return build_model(load_model_config(TINY_CONFIG), seed=0).to(device, dtype)


def batch(update: int, device="cpu") -> torch.Tensor:
    return torch.randint(3, 8000, (2, 16), generator=torch.Generator().manual_seed(update)).to(device)


def loss_of(model, update: int) -> torch.Tensor:
    ids = batch(update, next(model.parameters()).device)
    return model(input_ids=ids, labels=ids).loss


# -- known answers: each method = a float64 step-by-step reference of its equations ----------------------------------
def reference_run(name: str, multipliers_at: list[dict[str, float]], *, lr: float, base: float | None = None,
                  betas=(0.9, 0.95), eps=1e-8, device="cpu"):
    """Six AdamW updates of the float64 model written out by hand: m, v, their bias corrections, Adam's update u,
    and the method's decay of the pre-update p (module docstrings), with the base decay x the module-wise multipliers
    a combination's first method set (`multipliers_at[t]`: module -> multiplier at update t)."""
    model = tiny(device=device)
    base, form = decay_for(name) if base is None else base, name.split("+")[-1]
    params = dict(model.named_parameters())
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t, factor in enumerate(LR_FACTORS):
        lr_t = lr * factor
        model.zero_grad()
        loss_of(model, t).backward()
        with torch.no_grad():
            u, v_hat = {}, {}
            for n, p in params.items():
                g = p.grad
                m[n] = betas[0] * m[n] + (1 - betas[0]) * g
                v[n] = betas[1] * v[n] + (1 - betas[1]) * g * g
                v_hat[n] = v[n] / (1 - betas[1] ** (t + 1))
                u[n] = (m[n] / (1 - betas[0] ** (t + 1))) / (v_hat[n].sqrt() + eps)
            v_bar = sum(x.sum() for x in v_hat.values()) / sum(x.numel() for x in v_hat.values())
            for n, p in params.items():
                decay = base * multipliers_at[t].get(n.rsplit(".", 1)[0], 1.0)
                if form == "adamc" and p.dim() >= 2:  # every matrix of the LLaMA is in a matrix group, no vector is
                    decay = decay * lr_t / lr
                elif form == "independent":
                    decay = decay / lr
                elif form == "swd":
                    decay = decay / v_bar.sqrt()
                elif form == "cautious":
                    decay = decay * (u[n] * p >= 0).to(p.dtype)
                p.sub_(lr_t * decay * p + lr_t * u[n])
    return {n: p.detach().clone() for n, p in params.items()}


def library_run(name: str, *, lr: float, betas=(0.9, 0.95), eps=1e-8, kernel="forloop", device="cpu", **options):
    """The same six updates through alphadecay.wd.create on torch's AdamW `kernel`, the lr set by a torch LR
    scheduler (so lr_max is each group's initial_lr); also the module-wise multipliers at each update."""
    model = tiny(device=device)
    optimizer = torch.optim.AdamW(module_param_groups(model, decay_for(name)), lr=lr, betas=betas, eps=eps,
                                  **KERNELS[kernel])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: LR_FACTORS[min(t, len(LR_FACTORS) - 1)])
    scheduler = wd.create(name, model, optimizer, **options)
    multipliers = []
    for t in range(len(LR_FACTORS)):
        loss_of(model, t).backward()
        scheduler.step()
        multipliers.append(dict(getattr(scheduler.rule, "last_multipliers", {})))
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, multipliers


def max_relative_error(got: dict, expected: dict) -> float:
    return max(float((got[n] - expected[n]).norm() / expected[n].norm()) for n in expected)


@pytest.mark.parametrize("name,kernel", [(n, "forloop") for n in NEW + COMBINATIONS]
                         + [("cautious", "foreach"), ("swd", "foreach")])
def test_each_method_equals_a_float64_reference_of_its_equations(name, kernel, device="cpu"):
    got, multipliers = library_run(name, lr=1e-2, kernel=kernel, device=device, **options_for(name))
    expected = reference_run(name, multipliers, lr=1e-2, device=device)
    assert max_relative_error(got, expected) <= 1e-10
    # the reference can tell the method from plain AdamW at the same base decay
    plain = reference_run("uniform", [{}] * len(LR_FACTORS), lr=1e-2, base=decay_for(name), device=device)
    assert max_relative_error(plain, expected) > 1e-6
    if name.startswith("alphadecay"):
        assert len({round(x, 9) for x in multipliers[0].values()}) > 2  # the module-wise decays are not all equal


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fused", "foreach"])
@pytest.mark.parametrize("name", NEW + ("alphadecay+cautious",))
def test_each_method_equals_its_reference_with_torchs_cuda_kernels(name, kernel):
    test_each_method_equals_a_float64_reference_of_its_equations(name, kernel, device="cuda")


def test_adamc_all_groups_also_corrects_the_norms():
    model = tiny()
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1.0)
    matrices = wd.create("adamc", model, optimizer, peak_lr=2.0)
    set_learning_rate(optimizer, 0.5)  # lr_t / lr_max = 0.25
    matrices.step()
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays["norms"] == 0.1 and decays["embeddings"] == decays["lm_head"] == pytest.approx(0.025)
    wd.create("adamc", model, optimizer, peak_lr=2.0, adamc_groups="all").step()
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([0.025] * len(optimizer.param_groups))


def test_cautious_decays_only_where_the_update_and_the_weight_agree_in_sign():
    """One parameter, first AdamW step (exp_avg = 0, so the update's sign is the gradient's): the entries whose
    gradient has the weight's sign (or is 0) are decayed, the others not."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0], dtype=torch.float64))
    model = torch.nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(p.reshape(1, 5))
    model.weight.grad = torch.tensor([[0.5, -0.5, -0.5, 0.5, 0.0]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    scheduler = wd.create("cautious", model, optimizer)
    metrics = scheduler.step()
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # torch's decay is off: the rule applied it
    assert optimizer.param_groups[0]["effective_weight_decay"] == 0.5
    assert metrics["cautious/decayed_fraction"] == pytest.approx(3 / 5)
    expected = torch.tensor([[0.95, -0.95, 1.0, -1.0, 1.9]])  # p x (1 - lr x wd) where the signs agree or g = 0
    torch.testing.assert_close(model.weight.detach(), expected.float(), rtol=0, atol=1e-7)


# -- through torchrun_main.py (float32): the trainer applies the library's decays ------------------------------------
def test_the_trainer_applies_the_librarys_decays_given_the_same_weights_and_gradients(tmp_path, monkeypatch):
    """Every new method and combination, 4 updates of torchrun_main.py each: at update 2 (lr falling) its weights,
    gradients, optimizer and scheduler state are taken; the library, given those, must land on the trainer's weights
    after the update (to 1e-6 of the update's size), and a run without decay must not."""
    captured: dict[str, dict[int, dict]] = {}
    real_step = Scheduler.step

    def spy(self):
        if self.update in (2, 3):
            captured.setdefault(self.name, {})[self.update] = {
                "weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "grads": {n: p.grad.clone() for n, p in self.model.named_parameters()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "scheduler": copy.deepcopy(self.state_dict())}
        return real_step(self)

    monkeypatch.setattr(Scheduler, "step", spy)
    lr = 3e-3
    for name in NEW + COMBINATIONS:
        decay = 0.5 * lr if name == "independent" else decay_for(name)  # independent: wd / lr_max is AdamW's 0.5
        flags = dict(wd_scheduler=name, weight_decay=decay, lr=lr,
                     num_training_steps=4, warmup_steps=1, eval_every=100, save_every=100, unbalancedWD_every=2)
        assert run_main(train_args(tmp_path / name.replace("+", "_"), **flags)) == 0

    assert sorted(captured) == sorted(NEW + COMBINATIONS)
    for name, (before, after) in ((n, (c[2], c[3])) for n, c in captured.items()):
        def replay(method, **options):
            model = tiny(torch.float32)
            model.load_state_dict(before["weights"])
            optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=lr, foreach=False)
            optimizer.load_state_dict(before["optimizer"])
            for n, p in model.named_parameters():
                p.grad = before["grads"][n].clone()
            scheduler = wd.create(method, model, optimizer, **options)
            if method == name:
                scheduler.load_state_dict(before["scheduler"])
            else:  # no decay at all: what the update would be without one
                for group in optimizer.param_groups:
                    group["weight_decay"] = group["base_weight_decay"] = 0.0
            scheduler.step()
            optimizer.step()
            return {n: p.detach() for n, p in model.named_parameters()}

        library = replay(name, **options_for(name, peak_lr=lr))
        undecayed = replay("uniform")
        for n, p in library.items():
            step = (after["weights"][n] - before["weights"][n]).norm()
            assert (p - after["weights"][n]).norm() <= 1e-6 * step, (name, n)
        assert max(float((undecayed[n] - p).norm() / (p - before["weights"][n]).norm())
                   for n, p in library.items()) > 1e-4, name


# -- resume: the state dicts carry everything -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW + COMBINATIONS)
def test_stop_after_update_3_and_resume_from_the_state_dicts_is_exact(name):
    def run(updates, resume_from=None):
        model = tiny(torch.float32)
        optimizer = torch.optim.AdamW(module_param_groups(model, decay_for(name)), lr=1e-2)
        scheduler = wd.create(name, model, optimizer, **options_for(name, peak_lr=1e-2))
        if resume_from is not None:
            model.load_state_dict(resume_from["model"])
            optimizer.load_state_dict(resume_from["optimizer"])
            scheduler.load_state_dict(resume_from["scheduler"])
        losses, decays = [], []
        for update in range(scheduler.update, updates):
            set_learning_rate(optimizer, 1e-2 * LR_FACTORS[update])
            loss = loss_of(model, update)
            loss.backward()
            scheduler.step()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            decays.append([g["effective_weight_decay"] for g in optimizer.param_groups])
        state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict()})
        return losses, decays, state

    straight_losses, straight_decays, _ = run(6)
    *_, state = run(3)
    resumed_losses, resumed_decays, _ = run(6, resume_from=state)
    assert resumed_losses == straight_losses[3:] and resumed_decays == straight_decays[3:]
    if name not in ("cautious", "independent"):  # constant decays (cautious: its mask is per entry)
        assert len({tuple(d) for d in straight_decays}) > 1


def test_a_combination_resumes_exactly_through_the_command_line_with_the_timescale_rule(tmp_path, capsys):
    """alphadecay+cautious with its base decay from --wd_timescale (printed at start, recorded in config.json), 8
    updates straight or 4 + 4 after a resume."""
    flags = dict(wd_scheduler="alphadecay+cautious", unbalancedWD_every=3, weight_decay=None, wd_timescale=50)
    assert run_main(train_args(tmp_path / "straight", **flags)) == 0
    decay = 1 / (3e-3 * 50 * 8)
    assert f"weight decay {decay:.6g} = 1/(lr x timescale x T) from --wd_timescale 50, --lr 0.003, T = 8 updates" \
        in capsys.readouterr().out
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert saved["wd_timescale"] == 50 and saved["weight_decay"] == pytest.approx(decay)
    shutil.copytree(tmp_path / "straight" / "model_4", tmp_path / "resumed" / "model_4")
    assert run_main(train_args(tmp_path / "resumed", continue_from=tmp_path / "resumed" / "model_4", **flags)) == 0
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    for key in ("loss", "cautious/decayed_fraction", "weight_decay"):
        assert by_step(resumed, key) == {s: v for s, v in by_step(straight, key).items() if s > 4}, key
    passes = by_step(straight, "wd/model.layers.1.mlp.up_proj")
    assert sorted(passes) == [1, 3, 6] and len(set(passes.values())) > 1


# -- two ranks = one process, every new method in one spawn ---------------------------------------------------------
def rows(seed=0, count=8, length=24):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 8000, (count, length), generator=gen)
    return input_ids, input_ids.clone()


def three_updates(name, info, rank_rows):
    """Three updates of the float64 model through Trainer.train_step with a falling lr; `rank_rows` selects this
    process's rows of each update's global batch."""
    config, _ = parse_args(["--optimizer", "adamw", "--model_config", TINY_CONFIG])
    raw = tiny()
    optimizer = torch.optim.AdamW(module_param_groups(raw, decay_for(name)), lr=1e-2)
    model = raw
    if info.distributed:
        from alphadecay.loss import CausalLMLoss
        model = torch.nn.parallel.DistributedDataParallel(CausalLMLoss(raw))
    scheduler = wd.create(name, raw, optimizer, **options_for(name, peak_lr=1e-2))
    trainer = Trainer.for_updates(config, info, model, optimizer, wd_scheduler=scheduler, raw_model=raw)
    for update in range(3):
        set_learning_rate(optimizer, 1e-2 * LR_FACTORS[update + 1])
        input_ids, labels = rows(seed=update)
        trainer.train_step([{"input_ids": input_ids[rank_rows], "labels": labels[rank_rows]}])
    return {k: v.detach().clone() for k, v in raw.state_dict().items()}


def _ranks_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    result = {name: three_updates(name, info, slice(4 * rank, 4 * rank + 4)) for name in NEW + COMBINATIONS}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch_dist.destroy_process_group()


def test_two_processes_train_every_new_method_as_one_process(tmp_path):
    mp.spawn(_ranks_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    one = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    for name in NEW + COMBINATIONS:
        expected = three_updates(name, one, slice(0, 8))
        for result in ranks:
            for key in expected:
                torch.testing.assert_close(result[name][key], expected[key], rtol=1e-10, atol=1e-12)


# -- the ViT ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW + ("alphadecay+cautious",))
def test_the_vit_trains_with_each_new_method(digits_subset, tmp_path, name):
    decay = decay_for(name) * (2e-3 if name == "independent" else 1)
    assert run_vit(vit_args(digits_subset, tmp_path, optimizer="adamw", wd_scheduler=name, weight_decay=decay,
                            epochs=1, warmup_epochs=0, min_lr=0.1)) == 0
    metrics = read_metrics(tmp_path)
    losses, decays = by_step(metrics, "loss"), by_step(metrics, "weight_decay")
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses.values())
    if name == "independent":  # wd / lr_max, lr_max = --lr 2e-3, every group
        assert list(decays.values()) == pytest.approx([decay / 2e-3] * len(decays))
    elif name == "adamc":  # the cosine's first update is at lr_max: wd x 1, then less on the matrix groups
        assert decays[1] == pytest.approx(decay) and decays[10] < decay
    elif name == "swd":
        assert all(v > 0 for v in by_step(metrics, "swd/sqrt_v_bar").values())
    else:
        assert 0 < by_step(metrics, "cautious/decayed_fraction")[10] < 1


# -- errors and the timescale rule -----------------------------------------------------------------------------------
def test_the_new_methods_need_decoupled_decay():
    model = tiny(torch.float32)
    with pytest.raises(WeightDecayError, match="coupled L2 .* use torch.optim.AdamW"):
        wd.create("cautious", model, torch.optim.Adam(module_param_groups(model, 0.1), lr=1e-3))
    with pytest.raises(WeightDecayError, match="needs torch.optim.AdamW, not SGD"):
        wd.create("adamc", model, torch.optim.SGD(module_param_groups(model, 0.1), lr=1e-3))
    wd.create("adamc", model, torch.optim.Adam(module_param_groups(model, 0.1), lr=1e-3, decoupled_weight_decay=True))
    with pytest.raises(UserError, match="--wd_scheduler alphadecay\\+cautious is defined for decoupled weight decay"):
        parse_args(["--wd_scheduler", "alphadecay+cautious"])  # --optimizer adam is the default
    with pytest.raises(UserError, match="--wd_scheduler swd is defined for decoupled"):
        parse_vit_args(["--data_path", "x", "--wd_scheduler", "swd"])
    with pytest.raises(WeightDecayError, match="AMSGrad"):
        wd.create("swd", model, torch.optim.AdamW(module_param_groups(model, 0.1), amsgrad=True))


def test_without_peak_lr_or_an_lr_scheduler_the_lr_methods_say_what_to_give():
    model = tiny(torch.float32)
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
    scheduler = wd.create("independent", model, optimizer)
    with pytest.raises(WeightDecayError, match="pass peak_lr=..., or create the LR scheduler"):
        scheduler.step()
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5)  # sets every group's initial_lr to 1e-3
    scheduler.step()
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([100.0] * len(optimizer.param_groups))


def test_combination_names_are_validated_where_they_are_given():
    assert set(NEW + COMBINATIONS) <= set(wd.registry.names())
    assert wd.registry.parts("alphadecay+cautious") == ["alphadecay", "cautious"]
    config, _ = parse_args(["--wd_scheduler", "alphadecay+adamc", "--optimizer", "adamw"])
    assert config.use_modulewise_wd and config.esd_metric_for_tb == "alpha" and config.wd_method() == "alphadecay+adamc"
    model = tiny(torch.float32)
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1e-3)
    for bad, needle in (("cautious+alphadecay", "first, the form second: alphadecay\\+cautious"),
                        ("adamc+cautious", "two forms"), ("uniform+swd", "this is 'swd' alone"),
                        ("alphadecay+cautous", "did you mean 'cautious'")):
        with pytest.raises(WeightDecayError, match=needle):
            wd.create(bad, model, optimizer)
    with pytest.raises(UserError, match="invalid choice: 'adamc\\+swd'"):
        parse_args(["--wd_scheduler", "adamc+swd"])
    with pytest.raises(WeightDecayError, match="takes no option 'peak_lrr' \\(did you mean 'peak_lr'"):
        wd.create("alphadecay+adamc", model, optimizer, peak_lrr=1.0)


def test_the_timescale_rule_sets_the_base_decay():
    config, _ = parse_args(["--optimizer", "adamw", "--lr", "2e-3", "--wd_timescale", "0.25", "--num_training_steps",
                            "1000", "--warmup_steps", "10"])
    assert config.weight_decay == pytest.approx(1 / (2e-3 * 0.25 * 1000))  # 2.0
    independent, _ = parse_args(["--optimizer", "adamw", "--wd_scheduler", "independent", "--lr", "2e-3",
                                 "--wd_timescale", "0.25", "--num_training_steps", "1000", "--warmup_steps", "10"])
    assert independent.weight_decay == pytest.approx(1 / (0.25 * 1000))  # its unit: wd / lr_max is AdamW's
    for flags, needle in ((["--weight_decay", "0.1"], "give one of them"),
                          (["--optimizer", "adam"], "coupled L2"),
                          (["--wd_scheduler", "swd"], "no base decay gives a timescale"),
                          (["--wd_scheduler", "awd"], "no base decay gives a timescale"),
                          (["--wd_timescale", "0"], "a positive fraction")):
        with pytest.raises(UserError, match=needle):
            parse_args(["--optimizer", "adamw", "--wd_timescale", "0.25", *flags])
    with pytest.raises(UserError, match="give one of them"):
        parse_vit_args(["--data_path", "x", "--optimizer", "adamw", "--wd_timescale", "1", "--weight_decay", "0.1"])


def test_every_registered_method_is_in_the_readmes_table():
    readme = README.read_text()
    table = readme[readme.index("| name | source |"):]
    table = table[:table.index("\n\n")]
    assert [re.match(r"\| `([^`]+)`", line).group(1) for line in table.splitlines()[2:]] == list(METHODS)


README = Path(__file__).resolve().parents[1] / "README.md"
README_EXAMPLE_RUN = """
import shutil, sys
import alphadecay.wd.methods
alphadecay.wd.methods.__path__.append({extension!r})  # where the example's file lies (not the package's own folder)
from alphadecay.wd.registry import METHODS, Method
METHODS.update({{{entry}}})  # the README's registry line, as written
import torch, torchrun_main, vit_main
import alphadecay.wd as wd
from alphadecay.model import build_model, load_model_config
from tests.conftest import TINY_CONFIG, train_args, vit_args
flags = dict(wd_scheduler="lr_proportional", num_training_steps=6, warmup_steps=2, eval_every=100, save_every=3)
assert torchrun_main.main(train_args({out!r} + "/straight", **flags)) == 0
shutil.copytree({out!r} + "/straight/model_3", {out!r} + "/resumed/model_3")
assert torchrun_main.main(train_args({out!r} + "/resumed", continue_from={out!r} + "/resumed/model_3", **flags)) == 0
assert vit_main.main(vit_args({digits!r}, {out!r} + "/vit", wd_scheduler="lr_proportional", epochs=1)) == 0
model = build_model(load_model_config(TINY_CONFIG), seed=0)
optimizer = torch.optim.AdamW(wd.module_param_groups(model, 0.1), lr=1e-3)
scheduler = wd.create("lr_proportional", model, optimizer)
optimizer.param_groups[0]["lr"] = 5e-4
assert scheduler.step() == {{"wd_lr_multiplier": 0.5}}, "library"
assert {{g["weight_decay"] for g in optimizer.param_groups}} == {{0.05}}, "library decays"
"""


def test_the_readmes_adding_a_method_example_runs_as_written(tmp_path, digits_subset):
    """The README's method file and registry line, as written, train both entry points, resume exactly and work
    through alphadecay.wd.create (in a fresh interpreter: the configs read the registry when they are imported)."""
    text = README.read_text()
    start = text.index("**Adding a method**")
    section = text[start:text.index("\n### ", start)]  # up to the next subsection
    method_file, entry = re.findall(r"```python\n(.*?)```", section, re.S)
    path = method_file.splitlines()[0].lstrip("# ").strip()
    assert path == "alphadecay/wd/methods/lr_proportional.py" and (README.parent / path).parent.is_dir()
    assert f'"{path[:-3].replace("/", ".")}:build"' in entry
    (tmp_path / "extension").mkdir()
    (tmp_path / "extension" / "lr_proportional.py").write_text(method_file)
    script = README_EXAMPLE_RUN.format(extension=str(tmp_path / "extension"), entry=entry.strip().rstrip(","),
                                       out=str(tmp_path), digits=str(digits_subset))
    done = subprocess.run([sys.executable, "-c", script], cwd=README.parent, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    multipliers, lrs = by_step(straight, "wd_lr_multiplier"), by_step(straight, "lr")
    assert sorted(multipliers) == list(range(1, 7)) and len(set(multipliers.values())) > 2
    for step, multiplier in multipliers.items():
        assert multiplier == pytest.approx(lrs[step] / 3e-3)
        assert by_step(straight, "weight_decay")[step] == pytest.approx(0.1 * multiplier)
    for key in ("loss", "wd_lr_multiplier"):
        assert by_step(resumed, key) == {s: v for s, v in by_step(straight, key).items() if s > 3}, key
    assert by_step(read_metrics(tmp_path / "vit"), "wd_lr_multiplier")
