"""--parallelism fsdp (FSDP2) on CPU with 2 gloo processes: the same training as one process for every weight-decay
method, the sharded pieces against whole tensors (the spectral pass with NaN weights and an error on one rank,
a shard write failing on one rank), DCP checkpoints that verify (a manifest over both writers' files) and resume
on 1 process, under DDP and under FSDP (past a damaged newer checkpoint), and a DDP checkpoint that resumes under
FSDP.

One module fixture runs everything (process start-up dominates on 2 cores): the one-process references, one
torchrun launch of tests/fsdp_worker.py (the sharded-tensor checks, the four FSDP runs, two resumes), then the
one-process resumes of the FSDP checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from alphadecay import checkpoint as ckpt
from alphadecay import sharded_checkpoint
from alphadecay.esd import sharded
from tests.conftest import (REPO, TORCHRUN, by_step, free_port, pretokenize_dir, read_metrics, run_main,
                            train_args)

METHODS = ("uniform", "awd", "adadecay", "alphadecay")
# each method as the paper runs it, with a module-wise pass at updates 0, 2 and 5 (so a resume after update 3
# uses the decays of the pass at update 2, restored from the checkpoint's optimizer groups); clipping on, so that
# the sharded clip is exercised; the uniform runs compute the loss in chunks (the head's gradient by hand); AWD
# and AdaDecay on torch's foreach and fused AdamW kernels (the others: the for-loop, CPU's default)
METHOD_FLAGS = {"uniform": {"loss_chunk_tokens": 48}, "awd": {"optimizer_impl": "foreach"},
                "adadecay": {"unbalancedWD_every": 3, "optimizer_impl": "fused"},
                "alphadecay": {"unbalancedWD_every": 3}}


def flags(save_dir, rows, method, **overrides) -> list[str]:
    """6 updates of 8 rows of 64 tokens, float32 (the CPU default of train_args), a checkpoint after 3."""
    base = {"dataset": rows, "num_training_steps": 6, "warmup_steps": 2, "save_every": 3, "eval_every": 3,
            "target_eval_tokens": 1000, "grad_clipping": 1.0, "wd_scheduler": method, **METHOD_FLAGS[method]}
    return train_args(save_dir, **{**base, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    rows = pretokenize_dir(root / "rows", max_rows=200)
    out = {f"one-{m}": root / f"one-{m}" for m in METHODS}
    for method in METHODS:  # one process, micro-batch 2: 4 micro-batches per update
        assert run_main(flags(out[f"one-{method}"], rows, method, batch_size=2)) == 0
    (root / "checks").mkdir()
    plan = {"checks": str(root / "checks"), "runs": []}
    for method in METHODS:  # 2 processes, micro-batch 2: 2 micro-batches per update on each
        out[f"fsdp-{method}"] = root / f"fsdp-{method}"
        plan["runs"].append(flags(out[f"fsdp-{method}"], rows, method, batch_size=2, parallelism="fsdp"))
    # the FSDP checkpoint under 2-process DDP; the one-process (DDP-layout) checkpoint under 2-process FSDP
    out["ddp-from-fsdp"], out["fsdp-from-one"] = root / "ddp-from-fsdp", root / "fsdp-from-one"
    plan["runs"].append(flags(out["ddp-from-fsdp"], rows, "alphadecay", batch_size=4,
                              continue_from=out["fsdp-alphadecay"] / "model_3"))
    plan["runs"].append(flags(out["fsdp-from-one"], rows, "alphadecay", batch_size=4, parallelism="fsdp",
                              continue_from=out["one-alphadecay"] / "model_3"))
    (root / "plan.json").write_text(json.dumps(plan))
    worker = [f"--master_port={free_port()}", str(REPO / "tests" / "fsdp_worker.py"), str(root / "plan.json")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(TORCHRUN + worker, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # the FSDP checkpoint on one process: plain (DDP layout), and FSDP over a mesh of one, the latter given the run
    # directory whose newest checkpoint (model_6) lost the end of rank 1's shard: it resumes from model_3, which
    # verifies, replaces model_6 and deletes model_3 (--keep_checkpoints 1)
    out["one-from-fsdp"] = root / "one-from-fsdp"
    assert run_main(flags(out["one-from-fsdp"], rows, "alphadecay", batch_size=8,
                          continue_from=out["fsdp-alphadecay"] / "model_3")) == 0
    damaged = out["fsdp1-from-fsdp"] = root / "fsdp1-from-fsdp"
    for step in (3, 6):
        shutil.copytree(out["fsdp-alphadecay"] / f"model_{step}", damaged / f"model_{step}")
    shard = damaged / "model_6" / "dcp" / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size - 1)
    assert run_main(flags(damaged, rows, "alphadecay", batch_size=8, continue_from=damaged, parallelism="fsdp",
                          keep_checkpoints=1)) == 0
    out["rows"], out["checks"] = rows, root / "checks"
    return out


def close(a: float, b: float, rel: float) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))


# Values computed from norms over the whole model get 1e-4: torch's float32 vector norm on CPU accumulates with a
# relative error that grows with the tensor (1.4e-5 on a random 512,000-element tensor, the size of this model's
# embedding and lm_head, against float64), so one process's ‖g‖ and the shards' Σ‖g_r‖² differ by ~2e-5 while
# the gradients themselves agree to 1.5e-7; the one-process path is left as it was (alphadecay/wd/norms.py).
WHOLE_MODEL_NORMS = ("grad_norm", "awd/lambda_t", "awd/lambda_bar")


def assert_same_run(one: list[dict], two: list[dict], steps: list[int], awd: bool = False) -> None:
    """Losses within 1e-5; every logged alpha, decay and gradient norm within 1e-5 relative (WHOLE_MODEL_NORMS,
    and for AWD its decays, 1e-4)."""
    assert {s: v for s, v in by_step(one, "loss").items() if s in steps} == pytest.approx(
        {s: v for s, v in by_step(two, "loss").items() if s in steps}, abs=1e-5, rel=0)
    logged = ("alpha", "wd", "weight_decay", "awd/", "gradnorm/", "grad_norm")
    keys = {k for m in one for k in m if k.startswith(logged)}
    assert keys == {k for m in two for k in m if k.startswith(logged)} and keys
    for key in keys:
        a, b = by_step(one, key), by_step(two, key)
        a, b = {s: v for s, v in a.items() if s in steps}, {s: v for s, v in b.items() if s in steps}
        assert sorted(a) == sorted(b), key
        tolerance = 1e-4 if key in WHOLE_MODEL_NORMS or (awd and key.startswith(("wd", "weight_decay"))) else 1e-5
        assert all(close(a[s], b[s], tolerance) for s in a), (key, a, b)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_fsdp_processes_train_as_one_process(runs, method):
    one, two = read_metrics(runs[f"one-{method}"]), read_metrics(runs[f"fsdp-{method}"])
    assert sorted(by_step(one, "loss")) == list(range(1, 7))
    assert_same_run(one, two, list(range(1, 7)), awd=method == "awd")
    assert by_step(one, "eval_loss") == pytest.approx(by_step(two, "eval_loss"), abs=1e-5, rel=0)
    if method in ("adadecay", "alphadecay"):  # the passes at updates 0, 2, 5 were logged and set decays
        assert sorted(by_step(two, "wd_multiplier_mean")) == [1, 3, 6]
    provenance = json.loads((runs[f"fsdp-{method}"] / "config.json").read_text())
    assert provenance["parallelism"] == "fsdp" and provenance["provenance"]["reduce_dtype_resolved"] == "float32"


@pytest.mark.slow
def test_the_sharded_pieces_equal_whole_tensors(runs):
    """Gram route against full eigenvalues, the gather, the spectral pass (uneven shards; FARMS' min_step; a NaN
    weight gives a NaN row; an error on one rank raises on both), norms and the DTensor .item() trap, clipping
    (tests/fsdp_worker.py `checks`), on both ranks."""
    for rank in (0, 1):
        results = json.loads((runs["checks"] / f"checks-{rank}.json").read_text())
        assert len(results) == 19
        failed = {name: detail for name, (passed, detail) in results.items() if not passed}
        assert not failed, (rank, failed)


@pytest.mark.slow
@pytest.mark.parametrize("resumed", ["one-from-fsdp", "fsdp1-from-fsdp", "ddp-from-fsdp"])
def test_an_fsdp_checkpoint_resumes_on_one_process_and_under_ddp(runs, resumed):
    checkpoint = runs["fsdp-alphadecay"] / "model_3"
    assert sorted(p.name for p in (checkpoint / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "model.safetensors").exists()  # only the final checkpoint is also save_pretrained
    manifest = json.loads((checkpoint / ckpt.MANIFEST).read_text())["files"]  # over both writers' files
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "config.json", ckpt.STATE_FILE} <= set(manifest)
    assert ckpt.verify_checkpoint(str(checkpoint)) == ckpt.Verdict(True, True)
    if resumed == "fsdp1-from-fsdp":  # past the damaged model_6, which it rewrote; model_3 pruned
        assert sorted(p.name for p in runs[resumed].iterdir() if p.name.startswith(("model_", "."))) == ["model_6"]
        assert ckpt.verify_checkpoint(str(runs[resumed] / "model_6")) == ckpt.Verdict(True, True)
    state = ckpt.load_training_state(checkpoint)
    assert state["format"] == "dcp" and "optimizer" not in state and state["step"] == 3
    assert sorted(by_step(read_metrics(runs[resumed]), "loss")) == [4, 5, 6]
    assert_same_run(read_metrics(runs["fsdp-alphadecay"]), read_metrics(runs[resumed]), [4, 5, 6])


@pytest.mark.slow
def test_an_fsdp_checkpoint_holds_the_per_group_decays(runs):
    """The decays that updates 4 and 5 of a resumed run use (those of the pass at update 2, logged at step 3)
    come back with the optimizer's groups from the DCP shards, with the optimizer's step count."""
    from alphadecay.model import build_model, load_model_config
    from alphadecay.wd.groups import module_param_groups

    model = build_model(load_model_config(str(REPO / "configs" / "llama_1m.json")), seed=1)
    optimizer = torch.optim.AdamW(module_param_groups(model, 0.1), lr=1.0)
    sharded_checkpoint.load(str(runs["fsdp-alphadecay"] / "model_3"), model, optimizer)
    logged = {k.removeprefix("wd/"): v for k, v in next(m for m in read_metrics(runs["fsdp-alphadecay"])
                                                         if m["step"] == 3 and "wd_multiplier_mean" in m).items()
              if k.startswith("wd/")}
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert len(logged) == 13 and len(set(logged.values())) > 2
    assert {name: groups[name]["weight_decay"] for name in logged} == logged
    assert all(float(optimizer.state[p]["step"]) == 3 for g in optimizer.param_groups for p in g["params"])


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(runs):
    assert_same_run(read_metrics(runs["one-alphadecay"]), read_metrics(runs["fsdp-from-one"]), [4, 5, 6])


@pytest.mark.slow
def test_fsdp_checkpoints_are_readable_as_models(runs, capsys):
    from transformers import LlamaForCausalLM

    from alphadecay import evaluate
    from alphadecay.esd.report import load_model

    run_dir = runs["fsdp-alphadecay"]
    final = LlamaForCausalLM.from_pretrained(run_dir / "model_6", torch_dtype=torch.float32)  # gathered on rank 0
    from_shards = sharded_checkpoint.load_model(str(run_dir / "model_6"))
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), from_shards.state_dict().values()))
    assert set(final.state_dict()) == set(from_shards.state_dict())
    # model_3 has only its DCP shards: evaluate and the ESD report read it, and evaluate reproduces the run's value
    model = load_model(str(run_dir / "model_3"))
    assert isinstance(model, LlamaForCausalLM)
    assert evaluate.main([str(run_dir / "model_3"), "--device", "cpu"]) == 0
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("eval_"))
    assert float(printed["eval_loss"]) == pytest.approx(by_step(read_metrics(run_dir), "eval_loss")[3], abs=1e-6)


def test_row_counts_split_as_torch_chunk():
    for rows in (1, 5, 7, 64, 101):
        for world in (1, 2, 3, 4, 8):
            chunks = [len(c) for c in torch.arange(rows).chunk(world)]
            assert sharded.row_counts(rows, world) == chunks + [0] * (world - len(chunks))


@pytest.mark.parametrize("case", ["unknown", "reduce_dtype", "diagnostics", "cautious"])
def test_bad_parallelism_flags_are_one_clear_error(tmp_path, capsys, case):
    overrides, needle = {
        "unknown": ({"parallelism": "zero3"},
                    "argument --parallelism: invalid choice: 'zero3' (choose from 'ddp', 'fsdp')"),
        "reduce_dtype": ({"reduce_dtype": "float32"}, "--reduce_dtype float32 applies to --parallelism fsdp"),
        "diagnostics": ({"parallelism": "fsdp", "diagnostics_every": 2},
                        "--diagnostics_every is not available with --parallelism fsdp"),
        "cautious": ({"parallelism": "fsdp", "wd_scheduler": "alphadecay+cautious"},
                     "cautious reads Adam's moments over every parameter entry"),
    }[case]
    assert run_main(train_args(tmp_path / "run", **overrides)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "run").exists()
