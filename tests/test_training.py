"""End to end: training, evaluation, checkpoints, exact resume, SIGTERM, accumulation and DDP equivalence."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from transformers import LlamaForCausalLM

from alphadecay import dist
from alphadecay.checkpoint import load_checkpoint
from alphadecay.config import parse_args
from alphadecay.data import IGNORE_INDEX
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay import wd
from alphadecay.run import wrap_model
from alphadecay.trainer import StopFlag, Trainer
from alphadecay.wd.groups import module_param_groups
from tests.conftest import (REPO, TINY_CONFIG, by_step, free_port, read_metrics, run_main, run_subprocess,
                            train_args)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """8 uninterrupted updates with checkpoints after 4 and 8."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert run_main(train_args(run_dir)) == 0
    return run_dir


def test_training_lowers_the_loss_and_reports_perplexity(reference_run):
    metrics = read_metrics(reference_run)
    loss = by_step(metrics, "loss")
    assert sorted(loss) == list(range(1, 9))
    assert loss[8] < loss[1] - 0.3
    ppl = by_step(metrics, "eval_ppl")
    assert sorted(ppl) == [4, 8] and ppl[8] < ppl[4]
    official = by_step(metrics, "eval_ppl_official")
    assert official[8] < ppl[8]  # the official (n+1) divisor biases perplexity low
    record = next(m for m in metrics if m["step"] == 8 and "loss" in m)
    assert {"lr", "weight_decay", "tokens_seen", "tokens_per_s"} <= set(record)
    assert record["weight_decay"] == pytest.approx(0.1)


def test_checkpoints_are_loadable_save_pretrained_models(reference_run):
    for step in (4, 8):
        path = reference_run / f"model_{step}"
        assert (path / "training_state.pt").exists() and (path / "training_state.json").exists()
    model = LlamaForCausalLM.from_pretrained(reference_run / "model_8")
    assert model.config.vocab_size == 8000
    assert not any(p.name.startswith(".tmp") for p in reference_run.iterdir())


def test_resume_continues_exactly_as_if_never_stopped(reference_run, tmp_path):
    shutil.copytree(reference_run / "model_4", tmp_path / "model_4")
    assert run_main(train_args(None, continue_from=tmp_path / "model_4")) == 0
    resumed, reference = read_metrics(tmp_path), read_metrics(reference_run)
    for key in ("loss", "eval_loss", "tokens_seen", "lr"):
        ref = {s: v for s, v in by_step(reference, key).items() if s > 4}
        assert by_step(resumed, key) == ref, key
    after = LlamaForCausalLM.from_pretrained(tmp_path / "model_8").state_dict()
    before = LlamaForCausalLM.from_pretrained(reference_run / "model_8").state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_the_training_state_is_memory_mapped_and_never_written(reference_run, tmp_path):
    """load_checkpoint maps training_state.pt instead of reading it into the process (one page-cache copy for all
    the ranks of a node), on the device it is given; the optimizer's in-place updates must not reach the file."""
    shutil.copytree(reference_run / "model_4", tmp_path / "model_4")
    path = tmp_path / "model_4" / "training_state.pt"
    before = path.read_bytes()
    weights, saved = load_checkpoint(str(tmp_path / "model_4"), torch.device("cpu"))
    assert str(path) in Path("/proc/self/maps").read_text()
    assert {w.device.type for w in weights.values()} == {"cpu"}
    exp_avg = saved["optimizer"]["state"][0]["exp_avg"]
    exp_avg.add_(1.0)
    del weights, saved, exp_avg
    assert path.read_bytes() == before


def test_stop_flag_keeps_sigterm_and_passes_a_second_sigint_on():
    """The handlers that were there before StopFlag (recorders here) must see no SIGTERM and the second SIGINT."""
    seen = []
    before = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
              for sig in (signal.SIGTERM, signal.SIGINT)}
    flag = StopFlag()
    flag.install()
    try:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):  # SLURM's and torchrun's SIGTERM, one Ctrl-C
            os.kill(os.getpid(), sig)
            time.sleep(0.01)
        assert flag.raised and seen == []
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C twice: acts at once
        time.sleep(0.01)
        assert seen == [signal.SIGINT]
    finally:
        flag.uninstall()
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_two_sigterms_10ms_apart_save_a_checkpoint_and_the_resumed_run_matches(tmp_path):
    steps = 30
    args = train_args(tmp_path / "killed", num_training_steps=steps, save_every=1000, eval_every=1000)
    proc = subprocess.Popen([sys.executable, str(REPO / "torchrun_main.py"), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # as under SLURM: the job step's SIGTERM, then torchrun's
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    saved = [int(p.name.split("_")[1]) for p in (tmp_path / "killed").glob("model_*")]
    assert len(saved) == 1 and 3 <= saved[0] < steps, output
    assert "stopped by signal" in output
    assert run_main(args + ["--continue_from", str(tmp_path / "killed")]) == 0
    assert run_main(train_args(tmp_path / "straight", num_training_steps=steps, save_every=1000, eval_every=1000)) == 0
    assert by_step(read_metrics(tmp_path / "killed"), "loss") == by_step(read_metrics(tmp_path / "straight"), "loss")


# -- one update: accumulation and DDP give the gradient of the global token mean ---------------------------------
def make_rows(seed=0, rows=8, length=24):
    """Token rows with uneven padding, so per-micro-batch means would differ from the global token mean."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 8000, (rows, length), generator=gen)
    for r in range(rows):
        input_ids[r, 4 + 2 * r:] = 0
    labels = input_ids.clone()
    labels[input_ids == 0] = IGNORE_INDEX
    return input_ids, labels


def one_update(micro_batches, info, optimizer_name="adamw", updates=1, awd=False):
    """The loss of the last of `updates` updates on the same batch, the parameters after them, and the module the
    trainer ran (DDP through dist.ddp over several processes). With `awd`, AWD reads every gradient before each
    optimizer step."""
    config, _ = parse_args(["--optimizer", optimizer_name, "--weight_decay", "0.1", "--lr", "1e-2",
                            "--model_config", TINY_CONFIG])
    raw = build_model(load_model_config(TINY_CONFIG), seed=0).double()
    optimizer = build_optimizer(module_param_groups(raw, 0.1), config, info.device)
    scheduler = wd.create("awd", raw, optimizer, weight_decay=0.1, awd_multiplier=1.0) if awd else None
    model = wrap_model(raw, config, info, compile=False)
    trainer = Trainer.for_updates(config, info, model, optimizer, scheduler, raw_model=raw)
    for _ in range(updates):
        outcome = trainer.train_step(micro_batches)
    loss = outcome.loss_sum / outcome.counts[0]  # summed over ranks
    return loss, {k: v.detach().clone() for k, v in raw.state_dict().items()}, model


CPU1 = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.mark.parametrize("optimizer_name", ["adam", "adamw"])
def test_gradient_accumulation_equals_one_large_batch(optimizer_name):
    input_ids, labels = make_rows()
    whole = [{"input_ids": input_ids, "labels": labels}]
    split = [{"input_ids": input_ids[i:i + 2], "labels": labels[i:i + 2]} for i in range(0, 8, 2)]
    loss_a, params_a, _ = one_update(whole, CPU1, optimizer_name=optimizer_name)
    loss_b, params_b, _ = one_update(split, CPU1, optimizer_name=optimizer_name)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for key in params_a:
        torch.testing.assert_close(params_a[key], params_b[key], rtol=1e-10, atol=1e-12)


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    input_ids, labels = make_rows()
    mine = slice(4 * rank, 4 * rank + 4)  # rank 0 gets the long rows, rank 1 the short ones
    micro = [{"input_ids": input_ids[mine][i:i + 2], "labels": labels[mine][i:i + 2]} for i in (0, 2)]
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    loss, params, model = one_update(micro, info, updates=2, awd=True)
    model(micro[0]["input_ids"], micro[0]["labels"]).backward()  # where DDP leaves the gradients
    grads = [p.grad for p in model.module.parameters()]
    storages = {g.untyped_storage().data_ptr() for g in grads}
    torch.save({"loss": loss, "params": params, "grads": len(grads), "storages": len(storages)},
               os.path.join(out, f"rank{rank}.pt"))
    torch_dist.destroy_process_group()


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path):
    """Two updates (no_sync on the first of two micro-batches, AWD reading the gradients, zero_grad(set_to_none)
    between them) through dist.ddp, whose gradients are views into its all-reduce buckets
    (gradient_as_bucket_view: no second copy of the gradients), equal one process on the same global batch."""
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    input_ids, labels = make_rows()
    loss, params, _ = one_update([{"input_ids": input_ids, "labels": labels}], CPU1, updates=2, awd=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["storages"] < result["grads"] / 4  # the gradients share a few bucket storages
        assert result["loss"] == pytest.approx(loss, rel=1e-12)
        for key in params:
            torch.testing.assert_close(result["params"][key], params[key], rtol=1e-10, atol=1e-12)


def test_torchrun_two_processes_train_and_resume_exactly(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}"]
    env = {"OMP_NUM_THREADS": "1"}
    args = train_args(tmp_path / "ddp", num_training_steps=6, save_every=3, eval_every=3, batch_size=2)
    done = run_subprocess(args, launcher=launcher, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FutureWarning" not in done.stderr  # DDP is built with what torch 2.13 asks for (no broadcast_buffers)
    shutil.copytree(tmp_path / "ddp" / "model_3", tmp_path / "resumed" / "model_3")
    resumed = run_subprocess(train_args(tmp_path / "resumed", num_training_steps=6, save_every=3, eval_every=3,
                                        batch_size=2, continue_from=tmp_path / "resumed" / "model_3"),
                             launcher=launcher[:-1] + [f"--master_port={free_port()}"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, tail = by_step(read_metrics(tmp_path / "ddp"), "loss"), by_step(read_metrics(tmp_path / "resumed"), "loss")
    assert sorted(full) == list(range(1, 7)) and tail == {s: v for s, v in full.items() if s > 3}
    assert len({m["step"] for m in read_metrics(tmp_path / "ddp") if "eval_loss" in m}) == 2


# -- bad input: one paragraph, exit code 2, before any training ------------------------------------------------
@pytest.mark.parametrize("overrides,needle", [
    ({"model_config": "configs/nope.json"}, "--model_config configs/nope.json: no such file"),
    ({"total_batch_size": 10}, "--total_batch_size 10 is not a multiple of --batch_size 4"),
    ({"gradient_accumulation": 3}, "--gradient_accumulation 3 contradicts"),
    ({"dataset": "/nonexistent/c4"}, "--dataset /nonexistent/c4: no such directory"),
    ({"dataset": str(REPO / "configs")}, "no train shards matching en/c4-train"),
    ({"tokenizer": "/nonexistent/tok"}, "--tokenizer /nonexistent/tok: no such directory"),
    ({"model_config": str(REPO / "configs" / "llama_60m.json"), "tokenizer": None}, "needs the Hugging Face hub"),
    ({"continue_from": "/nonexistent/run"}, "--continue_from /nonexistent/run: no such directory"),
])
def test_bad_input_is_one_clear_error_before_training(tmp_path, capsys, monkeypatch, overrides, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = train_args(tmp_path, **overrides)
    if overrides.get("tokenizer", "") is None:
        args += ["--tokenizer", "t5-base"]
    assert run_main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_malformed_config_json_and_small_vocabulary(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden_size": 64,')
    assert run_main(train_args(tmp_path, model_config=bad)) == 2
    assert f"--model_config {bad} is not valid JSON" in capsys.readouterr().err
    small = tmp_path / "small.json"
    small.write_text((REPO / "configs" / "llama_1m.json").read_text().replace('"vocab_size": 8000', '"vocab_size": 1000'))
    assert run_main(train_args(tmp_path, model_config=small)) == 2
    assert "has vocab_size 1000" in capsys.readouterr().err


def test_user_errors_print_no_traceback(tmp_path):
    done = run_subprocess(train_args(tmp_path, batch_size=3))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.startswith("error: --total_batch_size 8")
    unknown = run_subprocess(["--no_such_flag", "1"])
    assert unknown.returncode == 2 and "unknown flag(s): --no_such_flag" in unknown.stderr


def test_a_run_directory_with_checkpoints_is_not_overwritten(reference_run, capsys):
    assert run_main(train_args(reference_run)) == 2
    assert f"--save_dir {reference_run} already holds checkpoints" in capsys.readouterr().err
    assert (reference_run / "model_8").exists()


@pytest.mark.parametrize("dtype,param_dtype", [("bfloat16", torch.bfloat16), ("amp_bf16", torch.float32)])
def test_bf16_runs_on_cpu(tmp_path, dtype, param_dtype):
    assert run_main(train_args(tmp_path, dtype=dtype, num_training_steps=3, eval_every=3, save_every=3)) == 0
    loss = by_step(read_metrics(tmp_path), "loss")
    assert len(loss) == 3 and all(v == v and v < 20 for v in loss.values())
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model_3", torch_dtype="auto")
    assert next(model.parameters()).dtype == param_dtype  # pure bf16 keeps bf16 weights; amp keeps float32 masters


def test_gradient_clipping_logs_the_norm_before_clipping(tmp_path):
    assert run_main(train_args(tmp_path, grad_clipping=0.01, num_training_steps=2, eval_every=100, save_every=100)) == 0
    norms = by_step(read_metrics(tmp_path), "grad_norm")
    assert sorted(norms) == [1, 2] and all(n > 0.01 for n in norms.values())


def test_wandb_offline_run_keeps_its_id_across_resume(tmp_path):
    args = train_args(tmp_path, wandb_mode="offline", num_training_steps=4, save_every=2, eval_every=100)
    assert run_main(args) == 0
    state = torch.load(tmp_path / "model_2" / "training_state.pt", weights_only=False)
    assert state["wandb_id"] and any((tmp_path / "wandb").glob(f"offline-run-*-{state['wandb_id']}"))
    shutil.rmtree(tmp_path / "model_4")
    assert run_main(args + ["--continue_from", str(tmp_path)]) == 0
    resumed = torch.load(tmp_path / "model_4" / "training_state.pt", weights_only=False)
    assert resumed["wandb_id"] == state["wandb_id"]
