"""Evaluation: per-row losses, the official estimator, independence of the layout, and the evaluation CLI."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from alphadecay import data, dist
from alphadecay.evaluate import evaluate_rows, main, official_estimate, row_loss_sums
from alphadecay.model import build_model, load_model_config
from tests.conftest import (REPO, SAMPLE, TINY_CONFIG, TOKENIZER, free_port, pretokenize_dir, read_metrics, run_main,
                            train_args)

SPEC = data.RowSpec(max_length=24, pad_id=0, eos_id=1, packing=False, appends_eos=True)
CPU1 = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_official_estimator_known_answer():
    """Rows (sum, targets): batches of 2 rows are [0,1], [2,3], [4]; each batch's token mean, summed, over 3 + 1."""
    sums = torch.tensor([6.0, 2.0, 9.0, 3.0, 5.0], dtype=torch.float64)
    counts = torch.tensor([3, 1, 4, 2, 1])
    batch_means = [(6 + 2) / (3 + 1), (9 + 3) / (4 + 2), 5 / 1]
    assert official_estimate(sums, counts, 2) == pytest.approx(sum(batch_means) / 4, rel=1e-15)
    assert official_estimate(sums, counts, 5) == pytest.approx(25 / 11 / 2, rel=1e-15)  # one batch: biased by 1/2
    assert official_estimate(sums, counts, 512) == official_estimate(sums, counts, 5)


def model_and_rows(rows=13):
    """The 1.1M model (float32) and rows with uneven right padding, so batch means differ from the token mean."""
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8000, (rows, SPEC.max_length), generator=gen, dtype=torch.int32)
    for r in range(rows):
        ids[r, 3 + (5 * r) % 20:] = SPEC.pad_id
    return model, ids


def test_row_loss_sums_are_the_per_row_cross_entropy():
    model, rows = model_and_rows(rows=3)
    input_ids = rows.long()
    sums, counts = row_loss_sums(model, input_ids, data.labels_for(input_ids, SPEC))
    for r in range(3):
        n = int((input_ids[r] != SPEC.pad_id).sum())
        logits = model(input_ids=input_ids[r:r + 1, :n]).logits[0, :-1]
        expected = torch.nn.functional.cross_entropy(logits, input_ids[r, 1:n], reduction="sum")
        assert counts[r] == n - 1 and sums[r].item() == pytest.approx(expected.item(), rel=1e-5)


def _evaluate_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    model, rows = model_and_rows()
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    result = evaluate_rows(model, rows, SPEC, info=info, batch_size=2, official_eval_rows=4)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch_dist.destroy_process_group()


def test_the_same_model_gives_the_same_evaluation_on_one_and_two_ranks_and_any_batch_size(tmp_path):
    model, rows = model_and_rows()  # 13 rows: ranks get 7 and 6; official batches of 4 rows: 4, 4, 4, 1
    one = [evaluate_rows(model, rows, SPEC, info=CPU1, batch_size=b, official_eval_rows=4) for b in (3, 13)]
    mp.spawn(_evaluate_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    input_ids = rows.long()
    with torch.no_grad():  # all rows in one batch
        sums, counts = row_loss_sums(model, input_ids, data.labels_for(input_ids, SPEC))
    expected = {"eval_loss": float(sums.sum() / counts.sum()), "eval_tokens": int(counts.sum()),
                "eval_loss_official": official_estimate(sums, counts, 4)}
    for result in one + two:
        assert result["eval_tokens"] == expected["eval_tokens"]
        for key in ("eval_loss", "eval_loss_official"):
            assert result[key] == pytest.approx(expected[key], rel=1e-6), key
        assert result["eval_ppl_official"] == pytest.approx(math.exp(result["eval_loss_official"]), rel=1e-12)
    # four batches: the (batches + 1) divisor biases the estimator low by about a fifth
    assert expected["eval_loss_official"] == pytest.approx(expected["eval_loss"] * 4 / 5, rel=0.1)
    assert model.training  # evaluation leaves the mode as it found it


# -- python -m alphadecay.evaluate -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """4 updates, evaluated and saved at the end; its last evaluation is what `evaluate` must reproduce."""
    run_dir = tmp_path_factory.mktemp("run")
    assert run_main(train_args(run_dir, num_training_steps=4, eval_every=4, save_every=4, official_eval_rows=8)) == 0
    last = [m for m in read_metrics(run_dir) if "eval_loss" in m][-1]
    assert last["step"] == 4
    return run_dir, last


EVAL_KEYS = ("eval_loss", "eval_ppl", "eval_loss_official", "eval_ppl_official", "eval_tokens")


def test_evaluate_a_checkpoint_equals_the_runs_last_evaluation(trained_run, tmp_path, capsys):
    run_dir, last = trained_run
    same = ["--dataset", SAMPLE, "--tokenizer", TOKENIZER, "--max_length", "64", "--target_eval_tokens", "4000",
            "--batch_size", "4", "--official_eval_rows", "8", "--dtype", "float32", "--device", "cpu"]
    assert all(v in train_args(None) for v in ("64", "4000", "float32"))  # the values trained_run used
    out = tmp_path / "eval.json"
    assert main([str(run_dir / "model_4"), *same, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in EVAL_KEYS:
        assert result[key] == last[key], key
    assert f"eval_loss {last['eval_loss']}" in capsys.readouterr().out
    # The run directory (its latest checkpoint), with the data flags taken from the run's config.json:
    assert main([str(run_dir), "--json", str(out)]) == 0
    assert all(json.loads(out.read_text())[key] == last[key] for key in EVAL_KEYS)
    # A bare save_pretrained directory (no run around it) with the same flags:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(run_dir / "model_4" / name, bare / name)
    assert main([str(bare), *same, "--json", str(out)]) == 0
    assert all(json.loads(out.read_text())[key] == last[key] for key in EVAL_KEYS)


def test_evaluate_under_torchrun_with_another_batch_size(trained_run, tmp_path):
    run_dir, last = trained_run
    out = tmp_path / "eval.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={free_port()}", "-m", "alphadecay.evaluate"]
    done = subprocess.run(launcher + [str(run_dir), "--batch_size", "3", "--json", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["batch_size"] == 3
    assert result["eval_tokens"] == last["eval_tokens"]
    for key in ("eval_loss", "eval_loss_official"):
        assert result[key] == pytest.approx(last[key], rel=1e-6), key


def test_evaluate_bad_path_is_a_user_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: neither a save_pretrained model directory")


def test_evaluate_on_pretokenized_rows_equals_streaming_and_chunked_loss(trained_run, tmp_path):
    """The same documents pretokenized give the same evaluation set, so the same values; a chunked head + loss
    (--loss_chunk_tokens) changes only float rounding."""
    run_dir, last = trained_run
    stored = pretokenize_dir(tmp_path / "rows", max_length=64)
    out = tmp_path / "eval.json"
    assert main([str(run_dir), "--dataset", stored, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eval_tokens"] == last["eval_tokens"]
    for key in ("eval_loss", "eval_loss_official"):
        assert result[key] == pytest.approx(last[key], rel=1e-6), key
    assert main([str(run_dir), "--loss_chunk_tokens", "50", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["loss_chunk_tokens"] == 50 and result["eval_tokens"] == last["eval_tokens"]
    for key in ("eval_loss", "eval_loss_official"):
        assert result[key] == pytest.approx(last[key], rel=1e-6), key
