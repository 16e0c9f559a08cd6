"""`python -m alphadecay.esd PATH`: the per-module spectral table and the decays AlphaDecay would assign."""

import json
import math
import subprocess
import sys

import pytest
import torch

from alphadecay import esd
from alphadecay.esd.report import main
from alphadecay.model import build_model, load_model_config
from tests.conftest import REPO, TINY_CONFIG


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    model.save_pretrained(path)
    return path, model


def test_json_rows_and_assigned_decays(saved_model, tmp_path, capsys):
    path, model = saved_model
    out = tmp_path / "esd.json"
    assert main([str(path), "--weight_decay", "0.1", "--wd_min_ratio", "0.5", "--wd_max_ratio", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["modules"]
    assert [r["name"] for r in rows][0] == "model.layers.0.self_attn.q_proj" and rows[-1]["name"] == "lm_head"
    assert len(rows) == 15 and {"name", "shape", "alpha", "D", "weight_decay"} <= set(rows[0])
    assert rows[0]["weight_decay"] is None and rows[-1]["weight_decay"] is None  # official exclusions
    decays = [r["weight_decay"] for r in rows[1:-1]]
    assert min(decays) == pytest.approx(0.05) and max(decays) == pytest.approx(0.2)
    direct = esd.module_metrics([("w", model.model.layers[1].mlp.up_proj.weight)])["w"]
    row = next(r for r in rows if r["name"] == "model.layers.1.mlp.up_proj")
    assert row["alpha"] == pytest.approx(direct["alpha"]) and row["shape"] == [176, 64]
    sigma = torch.linalg.matrix_norm(model.model.layers[1].mlp.up_proj.weight.double(), ord=2).item()
    assert row["sigma_max"] == pytest.approx(sigma, rel=1e-5)
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.up_proj" in table and "mean alpha by type" in table


def test_keep_first_and_last_layer(saved_model, tmp_path):
    out = tmp_path / "esd.json"
    assert main([str(saved_model[0]), "--remove_first_layer", "false", "--remove_last_layer", "false",
                 "--json", str(out)]) == 0
    assert all(r["weight_decay"] is not None for r in json.loads(out.read_text())["modules"])


def test_module_entry_point_and_bad_path(saved_model, tmp_path):
    done = subprocess.run([sys.executable, "-m", "alphadecay.esd", str(saved_model[0])], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "lm_head" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "alphadecay.esd", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_a_nan_weight_is_reported_as_nan_and_the_others_as_usual(saved_model, tmp_path):
    """`python -m alphadecay.esd` on a model with a NaN weight: that module's row is NaN and keeps the base decay
    (the maps leave NaN metrics out), every other row is the clean model's."""
    path, model = saved_model
    poisoned = build_model(load_model_config(TINY_CONFIG), seed=0)
    poisoned.load_state_dict(model.state_dict())
    with torch.no_grad():
        poisoned.model.layers[1].mlp.up_proj.weight[2, 3] = float("nan")
    poisoned.save_pretrained(tmp_path / "poisoned")
    rows = {}
    for name, source in (("clean", path), ("poisoned", tmp_path / "poisoned")):
        assert main([str(source), "--json", str(tmp_path / f"{name}.json")]) == 0
        rows[name] = {r["name"]: r for r in json.loads((tmp_path / f"{name}.json").read_text())["modules"]}
    bad = rows["poisoned"].pop("model.layers.1.mlp.up_proj")
    assert all(math.isnan(bad[k]) for k in ("alpha", "D", "sigma_max", "stable_rank")) and bad["weight_decay"] == 0.1
    clean_alphas = {n: r["alpha"] for n, r in rows["clean"].items() if n != "model.layers.1.mlp.up_proj"}
    assert {n: r["alpha"] for n, r in rows["poisoned"].items()} == clean_alphas
