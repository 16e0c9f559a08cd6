"""What a run resolves and records besides its flags: --dtype auto, and the provenance of config.json/metrics."""

import json

import pytest
import torch
import transformers

from alphadecay.config import PROVENANCE_KEYS
from alphadecay.model import resolve_dtype
from tests.conftest import by_step, read_metrics, run_main, train_args
from tests.test_scripts import load_make_tables, synthetic_config, write_run


@pytest.mark.parametrize("capability,expected", [((7, 0), "float32"), ((7, 5), "float32"), ((8, 0), "bfloat16"),
                                                 ((9, 0), "bfloat16")])
def test_dtype_auto_is_bf16_only_from_compute_capability_8(monkeypatch, capability, expected):
    """V100 (7.0) and T4 (7.5) emulate bf16, and torch.cuda.is_bf16_supported() says yes there too."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    dtype, autocast, name = resolve_dtype("auto", torch.device("cuda", 0))
    assert name == expected and dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[expected]
    assert not autocast


def test_dtype_names_resolve_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.float32, False, "float32")
    assert resolve_dtype("amp_bf16", torch.device("cpu")) == (torch.float32, True, "amp_bf16")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == (torch.bfloat16, False, "bfloat16")


# -- what a run records ------------------------------------------------------------------------------------------
def test_config_json_and_metrics_record_the_provenance(tmp_path):
    assert run_main(train_args(tmp_path, num_training_steps=2, eval_every=2, save_every=2)) == 0
    saved = json.loads((tmp_path / "config.json").read_text())
    recorded = saved["provenance"]
    assert set(PROVENANCE_KEYS) <= set(recorded)
    assert {k: recorded[k] for k in ("world_size", "micro_batch", "gradient_accumulation", "dtype_resolved",
                                     "optimizer_impl_resolved", "official_eval_rows", "torch", "transformers")} == {
        "world_size": 1, "micro_batch": 4, "gradient_accumulation": 2, "dtype_resolved": "float32",
        "optimizer_impl_resolved": "forloop", "official_eval_rows": 512, "torch": torch.__version__,
        "transformers": transformers.__version__}
    assert recorded["eval_rows"] > 0 and recorded["eval_tokens"] == by_step(read_metrics(tmp_path), "eval_tokens")[2]
    assert read_metrics(tmp_path)[0] == {"step": 0, "provenance": recorded}


# -- make_tables refuses to average runs whose provenance differs -------------------------------------------------
def write_recorded_run(run_dir, seed: int, *segments: dict) -> None:
    """A finished 1000-update run whose metrics.jsonl holds one provenance event per (re)start."""
    config = synthetic_config("adam", "130m", 1e-5, "alphadecay", seed)
    write_run(run_dir, config, [(1000, 23.0 + seed / 10, 22.0)])
    events = [json.dumps({"step": 500 * i, "provenance": p}) for i, p in enumerate(segments)]
    with open(run_dir / "metrics.jsonl") as fh:
        rest = fh.read()
    (run_dir / "metrics.jsonl").write_text("\n".join(events) + "\n" + rest)


LAYOUT = {"world_size": 2, "micro_batch": 256, "gradient_accumulation": 1, "dtype_resolved": "bfloat16",
          "optimizer_impl_resolved": "foreach", "official_eval_rows": 512, "eval_rows": 52000,
          "eval_tokens": 9_990_000, "torch": "2.13.0", "transformers": "5.24.0", "git_commit": "abc"}


def test_make_tables_refuses_a_cell_whose_runs_differ_in_provenance(tmp_path, capsys):
    write_recorded_run(tmp_path / "a", 5, LAYOUT)
    write_recorded_run(tmp_path / "b", 6, {**LAYOUT, "world_size": 1, "micro_batch": 512, "git_commit": "def"})
    make_tables = load_make_tables()
    assert make_tables.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the runs of cell Adam 130M WD 1e-5 AlphaDecay differ in world_size (")
    assert f"{tmp_path / 'a'}: 2" in err and f"{tmp_path / 'b'}: 1" in err and "micro_batch" in err
    assert "git_commit" not in err  # where the code came from is recorded, but does not change the numbers
    assert make_tables.main([str(tmp_path), "--allow_mixed"]) == 0
    captured = capsys.readouterr()
    assert "| AlphaDecay | 23.55 ± 0.07 (n=2) † |" in captured.out and "† averages runs" in captured.out
    assert "warning: cell Adam 130M WD 1e-5 AlphaDecay averages runs that differ in world_size" in captured.err


def test_make_tables_averages_runs_alike_and_refuses_a_run_resumed_differently(tmp_path, capsys):
    write_recorded_run(tmp_path / "a", 5, LAYOUT)
    write_recorded_run(tmp_path / "b", 6, {**LAYOUT, "git_commit": "def"})
    make_tables = load_make_tables()
    assert make_tables.main([str(tmp_path)]) == 0
    assert "| AlphaDecay | 23.55 ± 0.07 (n=2) |" in capsys.readouterr().out
    write_recorded_run(tmp_path / "c", 7, LAYOUT, {**LAYOUT, "optimizer_impl_resolved": "fused"})  # one run, resumed
    assert make_tables.main([str(tmp_path)]) == 2
    assert f"optimizer_impl_resolved ({tmp_path / 'a'}: \"foreach\"" in capsys.readouterr().err
