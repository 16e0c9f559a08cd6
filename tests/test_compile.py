"""--compile: torch.compile of the model and its loss gives the eager updates (CPU inductor), checkpoints carry no
compiled-module prefixes, and a run resumes across --compile true/false. The compiling tests are slow (tens of
seconds of compilation on a 2-core CPU, less once inductor's on-disk cache holds the graphs)."""

import os
import shutil

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from alphadecay import dist
from alphadecay.config import parse_args
from alphadecay.errors import UserError
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.wd.groups import module_param_groups
from alphadecay.run import resolve_compile, wrap_model
from alphadecay.trainer import Trainer
from tests.conftest import TINY_CONFIG, by_step, free_port, read_metrics, run_main, train_args
from tests.test_training import make_rows

CPU1 = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def losses_of_updates(compiled: bool, chunk: int, updates: int = 5) -> list[float]:
    """Per-update mean losses of `updates` AdamW updates of the 1.1M model on one fixed batch of 4 x 64 tokens."""
    config, _ = parse_args(["--model_config", TINY_CONFIG, "--optimizer", "adamw", "--lr", "3e-3",
                            "--weight_decay", "0.1", "--loss_chunk_tokens", str(chunk)])
    raw = build_model(load_model_config(TINY_CONFIG), seed=0)
    optimizer = build_optimizer(module_param_groups(raw, 0.1), config, CPU1.device)
    model = wrap_model(raw, config, CPU1, compile=compiled)
    trainer = Trainer.for_updates(config, CPU1, model, optimizer, raw_model=raw)
    ids = torch.randint(3, 8000, (4, 64), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(updates):  # the same rows each time, so that the loss falls
        outcome = trainer.train_step([{"input_ids": ids, "labels": ids}])
        losses.append(outcome.loss_sum / outcome.counts[0])
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 96])
def test_five_compiled_updates_give_the_eager_losses(chunk):
    eager = losses_of_updates(compiled=False, chunk=chunk)
    compiled = losses_of_updates(compiled=True, chunk=chunk)
    assert eager[-1] < eager[0]  # the updates do something
    assert compiled == pytest.approx(eager, abs=1e-4, rel=0)


@pytest.mark.slow
def test_checkpoints_of_compiled_runs_resume_without_compile_and_back(tmp_path):
    common = dict(num_training_steps=4, save_every=2, eval_every=100)
    assert run_main(train_args(tmp_path / "compiled", compile="true", **common)) == 0
    keys = load_file(tmp_path / "compiled" / "model_2" / "model.safetensors").keys()
    assert keys and not any("_orig_mod" in k or k.startswith("model.model.model") for k in keys)
    assert "lm_head.weight" in keys
    # compiled -> eager
    shutil.copytree(tmp_path / "compiled" / "model_2", tmp_path / "to_eager" / "model_2")
    assert run_main(train_args(tmp_path / "to_eager", compile="false", continue_from=tmp_path / "to_eager" / "model_2",
                               **common)) == 0
    # eager -> compiled
    assert run_main(train_args(tmp_path / "eager", compile="false", **common)) == 0
    shutil.copytree(tmp_path / "eager" / "model_2", tmp_path / "to_compiled" / "model_2")
    assert run_main(train_args(tmp_path / "to_compiled", compile="true",
                               continue_from=tmp_path / "to_compiled" / "model_2", **common)) == 0
    for resumed, straight in (("to_eager", "compiled"), ("to_compiled", "eager")):
        tail = by_step(read_metrics(tmp_path / resumed), "loss")
        full = by_step(read_metrics(tmp_path / straight), "loss")
        assert sorted(tail) == [3, 4]
        assert [tail[s] for s in (3, 4)] == pytest.approx([full[s] for s in (3, 4)], abs=1e-4, rel=0)


def one_update_with_gradient_sized_steps(micro, info, compiled, chunk=0):
    """Parameters after one AdamW update with eps 1, i.e. a step of about lr * g: HF's float64 model runs its norms
    and rotary embeddings in float32, so compiled gradients differ from eager ones at the 1e-7 level, and the
    default eps would turn that into sign flips, g / (|g| + 1e-8), on gradients near zero."""
    config, _ = parse_args(["--optimizer", "adamw", "--weight_decay", "0.1", "--lr", "1e-2", "--adam_eps", "1",
                            "--model_config", TINY_CONFIG, "--loss_chunk_tokens", str(chunk)])
    raw = build_model(load_model_config(TINY_CONFIG), seed=0).double()
    optimizer = build_optimizer(module_param_groups(raw, 0.1), config, info.device)
    trainer = Trainer.for_updates(config, info, wrap_model(raw, config, info, compile=compiled), optimizer,
                                  raw_model=raw)
    outcome = trainer.train_step(micro)
    loss = outcome.loss_sum / outcome.counts[0]  # summed over ranks
    return loss, {k: v.detach().clone() for k, v in raw.state_dict().items()}


def _compiled_ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    input_ids, labels = make_rows()
    mine = slice(4 * rank, 4 * rank + 4)
    micro = [{"input_ids": input_ids[mine][i:i + 2], "labels": labels[mine][i:i + 2]} for i in (0, 2)]
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    for chunk in DDP_CHUNKS:
        torch._dynamo.reset()
        loss, params = one_update_with_gradient_sized_steps(micro, info, compiled=True, chunk=chunk)
        torch.save({"loss": loss, "params": params}, os.path.join(out, f"rank{rank}-chunk{chunk}.pt"))
    torch_dist.destroy_process_group()


DDP_CHUNKS = (0, 20)  # the full loss, and the chunked one: 48 tokens per micro-batch = chunks of 20, 20 and 8


@pytest.mark.slow
def test_compiled_ddp_with_accumulation_equals_one_eager_process(tmp_path):
    """DDP around the compiled module (dynamo's DDPOptimizer splits the graph at DDP's buckets), no_sync on the
    first of two micro-batches, with the full and the chunked loss (whose custom autograd Function is traced into
    the graph): the update equals one eager process with the full loss on the same global batch."""
    mp.spawn(_compiled_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    input_ids, labels = make_rows()
    loss, params = one_update_with_gradient_sized_steps([{"input_ids": input_ids, "labels": labels}], CPU1,
                                                        compiled=False)
    for rank in (0, 1):
        for chunk in DDP_CHUNKS:
            result = torch.load(tmp_path / f"rank{rank}-chunk{chunk}.pt")
            assert result["loss"] == pytest.approx(loss, rel=1e-6)
            for key, value in params.items():  # a step moves a parameter by up to ~1e-2 x 4 (the largest gradients)
                torch.testing.assert_close(result["params"][key], value, rtol=0, atol=1e-7, msg=(key, chunk))


def test_compile_auto_is_off_on_cpu_and_a_missing_compiler_is_a_clear_error(monkeypatch):
    config, _ = parse_args(["--compile", "auto"])
    assert resolve_compile(config, torch.device("cpu")) is False
    config, _ = parse_args(["--compile", "false"])
    assert resolve_compile(config, torch.device("cpu")) is False
    config, _ = parse_args(["--compile", "true"])
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(UserError, match="--compile true on CPU needs a C\\+\\+ compiler"):
        resolve_compile(config, torch.device("cpu"))
    with pytest.raises(UserError, match="--compile"):
        parse_args(["--compile", "yes"])
