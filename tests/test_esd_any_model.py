"""`python -m alphadecay.esd PATH` on any Hugging Face causal LM: GPT-2 (Conv1D, tied head), Qwen2, Mistral and
GPT-NeoX saved with save_pretrained, a model served by a (local) hub, and the offline error."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import alphadecay.wd as wd
from alphadecay import esd
from alphadecay.esd.report import main
from alphadecay.wd.groups import module_matrix, weight_modules
from tests.conftest import REPO
from tests.hub_server import LocalHub
from tests.test_hub import hub_env
from tests.test_wd_library import tiny_hf


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "mistral", "neox"])
def test_rows_are_the_weight_modules_and_decays_are_the_librarys(kind, tmp_path):
    model = tiny_hf(kind)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "esd.json"
    assert main([str(tmp_path / "model"), "--json", str(out)]) == 0  # --weight_decay 0.1, ratios 0.6666..5
    rows = json.loads(out.read_text())["modules"]
    modules = weight_modules(model)
    assert [r["name"] for r in rows] == [n for n, _ in modules]
    assert [r["shape"] for r in rows] == [list(module_matrix(m).shape) for _, m in modules]  # (out, in)
    direct = esd.module_metrics([(n, module_matrix(m).detach()) for n, m in modules])
    assert [r["alpha"] for r in rows] == pytest.approx([direct[n]["alpha"] for n, _ in modules], rel=1e-6, nan_ok=True)
    scheduler = wd.create("alphadecay", model, torch.optim.AdamW(wd.module_param_groups(model, 0.1)), max_ratio=5.0)
    scheduler.step()  # the library's pass on the same weights
    tuned = {r["name"]: r["weight_decay"] for r in rows if r["weight_decay"] is not None}
    assert list(tuned) == scheduler.rule.modules and len(tuned) >= 4
    assert list(tuned.values()) == pytest.approx([scheduler.last_weight_decays()[n] for n in tuned], rel=1e-6)
    if kind == "gpt2":  # Conv1D stores (in, out); the row is the matrix (out, in); the tied lm_head is not tuned
        c_fc = next(r for r in rows if r["name"] == "transformer.h.0.mlp.c_fc")
        assert c_fc["shape"] == [256, 64] and rows[-1]["name"] == "lm_head" and rows[-1]["weight_decay"] is None
        assert [r["name"] for r in rows if r["weight_decay"] is None] == ["transformer.h.0.attn.c_attn", "lm_head"]


def test_a_hub_model_name_loads_from_the_hub_and_offline_is_a_clear_error(tmp_path, monkeypatch, capsys):
    tiny_hf("gpt2").save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    with LocalHub({("models", "alphadecay-test/gpt2"): str(tmp_path / "gpt2")}) as hub:
        done = subprocess.run([sys.executable, "-m", "alphadecay.esd", "alphadecay-test/gpt2", "--json",
                               str(tmp_path / "esd.json")], cwd=REPO, env=hub_env(hub, tmp_path / "home"),
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "esd.json").read_text())["modules"]
    assert len(rows) == 9 and rows[0]["name"] == "transformer.h.0.attn.c_attn" and rows[-1]["name"] == "lm_head"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["alphadecay-test/gpt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the model alphadecay-test/gpt2 needs the Hugging Face hub, but HF_HUB_OFFLINE is set")
    assert "give a local save_pretrained directory" in err and "Traceback" not in err
    assert main([str(tmp_path / "no/such/dir")]) == 2
    assert "no such file or directory, and not a hub model name" in capsys.readouterr().err
