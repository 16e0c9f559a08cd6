"""examples/plain_loop.py is torchrun_main.py's run: with the same model, data order, optimizer and flags (float32 CPU,
passes every 2 updates over 6), the same loss at every update and the same weight-decay metrics (wd/<module>,
alpha/<module>, awd/lambda_bar, ...) at every update that has them; stopped after update 3 and resumed through its
state dicts, the same again. (examples/hf_trainer.py runs in tests/test_integrations_hf.py.)"""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO, SAMPLE, TINY_CONFIG, TOKENIZER, read_metrics, run_main, train_args

sys.path.insert(0, str(REPO / "examples"))
import plain_loop  # noqa: E402

MODULEWISE = ("alphadecay", "adadecay")


def example(method: str, *extra: str) -> list[dict]:
    return plain_loop.main(["--method", method, "--every", "2", "--model_config", TINY_CONFIG, "--dataset", SAMPLE,
                            "--tokenizer", TOKENIZER, "--updates", "6", "--batch_size", "4", "--max_length", "64",
                            "--lr", "3e-3", "--warmup", "2", "--shuffle_buffer", "64", *extra])


@pytest.mark.parametrize("method", ["uniform", "awd", "adadecay", "alphadecay"])
def test_the_plain_loop_equals_torchrun_main_and_resumes_through_the_state_dicts(method, tmp_path):
    every = {"unbalancedWD_every": 2} if method in MODULEWISE else {}
    assert run_main(train_args(tmp_path / "run", wd_scheduler=method, num_training_steps=6, batch_size=4,
                               total_batch_size=4, warmup_steps=2, log_every=1, eval_every=6, save_every=6,
                               wd_min_ratio=0.6666, **every)) == 0  # the library's default ratio
    logged: dict[int, dict] = {}
    for event in read_metrics(tmp_path / "run"):
        logged.setdefault(event["step"], {}).update(event)
    records = example(method)
    assert [r["update"] for r in records] == list(range(6))
    for record in records:
        reference = logged[record["update"] + 1]  # logged at the updates completed
        keys = set(record) - {"update"}
        assert keys <= set(reference)
        assert {k: record[k] for k in keys} == pytest.approx({k: reference[k] for k in keys}, rel=1e-6, abs=1e-12)
    passes = [r["update"] for r in records if any(k.startswith("wd/") for k in r)]
    assert passes == ([0, 1, 3, 5] if method in MODULEWISE else [])
    if method == "awd":
        assert len({r["awd/lambda_bar"] for r in records}) == 6
    if method in ("awd", "alphadecay"):  # stop after update 3, resume from the state dicts
        example(method, "--stop_after", "3", "--save", str(tmp_path / "state.pt"))
        assert example(method, "--resume", str(tmp_path / "state.pt")) == records[3:]
