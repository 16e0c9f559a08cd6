"""Figures: `python -m alphadecay.plot` on run directories, `python -m alphadecay.esd --plot` on a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from alphadecay import plot
from alphadecay.config import TrainConfig
from alphadecay.esd.report import main as esd_main
from alphadecay.metrics import read_metrics
from tests.conftest import REPO, TINY_CONFIG

PNG = b"\x89PNG\r\n\x1a\n"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES = [f"model.layers.{layer}.{'self_attn' if k[0] in 'qkvo' else 'mlp'}.{k}" for layer in range(2) for k in KINDS]
PASS_STEPS = (1, 5, 10)


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def alpha_of(i: int, step: int) -> float:
    return 2.0 + 0.1 * i + 0.01 * step


def multiplier_of(i: int, step: int) -> float:
    return 0.5 + 0.2 * i + 0.001 * step


def write_run(path, *, method: str = "alphadecay", weight_decay: float = 0.1, seed: int = 0, passes: bool = True,
              metric: str = "alpha", partial_tail: bool = True) -> None:
    """A synthetic run directory: config.json and a metrics.jsonl of 10 updates with module-wise passes at
    PASS_STEPS, evaluations at 5 and 10, and (optionally) a half-written last line, as a live run leaves it."""
    path.mkdir(parents=True)
    config = TrainConfig(wd_scheduler=method, weight_decay=weight_decay, seed=seed, optimizer="adamw").to_dict()
    (path / "config.json").write_text(json.dumps(config))
    lines = []
    for step in range(1, 11):
        event = {"step": step, "loss": 8.0 - 0.3 * step, "lr": 1e-3, "weight_decay": weight_decay}
        if passes and step in PASS_STEPS:
            for i, name in enumerate(MODULES):
                event[f"{metric}/{name}"] = alpha_of(i, step)
                event[f"wd/{name}"] = weight_decay * multiplier_of(i, step)
            event["alpha_Q"] = 2.0
        lines.append(json.dumps(event))
        if step in (5, 10):
            loss = 7.0 - 0.1 * step
            lines.append(json.dumps({"step": step, "eval_loss": loss, "eval_ppl": float(np.exp(loss))}))
    text = "\n".join(lines) + "\n"
    if partial_tail:
        text += '{"step": 11, "loss": 4.9, "lr": 0.00'
    (path / "metrics.jsonl").write_text(text)


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """`python -m alphadecay.plot ARGS` in this process (the entry point itself is tested once, by subprocess)."""
    def run(*args) -> Done:
        capsys.readouterr()
        code = plot.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return run


# -- reading a run -------------------------------------------------------------------------------------------------
def test_read_metrics_skips_a_half_written_last_line_only(tmp_path):
    write_run(tmp_path / "run")
    events = read_metrics(str(tmp_path / "run"))
    assert events[-1] == {"step": 10, "eval_loss": 6.0, "eval_ppl": pytest.approx(np.exp(6.0))}
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(str(broken))


def test_module_series_in_model_order_and_the_decay_multipliers(tmp_path):
    write_run(tmp_path / "run", weight_decay=0.05)
    run = plot.load_run(str(tmp_path / "run"))
    steps, names, alphas = plot.module_series(run.events, "alpha")
    assert steps == list(PASS_STEPS) and names == MODULES
    np.testing.assert_allclose(alphas, [[alpha_of(i, s) for s in PASS_STEPS] for i in range(len(MODULES))])
    steps, names, decays = plot.module_series(run.events, "wd")
    assert plot.base_decay(run.config) == 0.05
    np.testing.assert_allclose(decays / 0.05, [[multiplier_of(i, s) for s in PASS_STEPS] for i in range(len(MODULES))])
    fig = plot.heatmap_figure(steps, names, decays / 0.05, title="t", colorbar="c")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), decays / 0.05)  # rows = modules, columns = passes
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][:5] == ["0 q", "0 k", "0 v", "0 o", "0 gate"]


def test_labels_say_method_optimizer_and_decay(tmp_path):
    write_run(tmp_path / "a" / "run", method="alphadecay", weight_decay=0.1, seed=0)
    write_run(tmp_path / "b" / "run", method="alphadecay", weight_decay=0.1, seed=1)
    write_run(tmp_path / "c", method="uniform", weight_decay=0.05, passes=False)
    runs = [plot.load_run(str(p)) for p in (tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c")]
    plot.label_runs(runs)
    assert [r.label for r in runs] == ["alphadecay, adamw, wd 0.1, seed 0", "alphadecay, adamw, wd 0.1, seed 1",
                                       "uniform, adamw, wd 0.05"]
    assert [r.name for r in runs] == ["run", "run-2", "c"]  # distinct file prefixes


# -- the command line ----------------------------------------------------------------------------------------------
def test_every_figure_from_a_metrics_file(tmp_path, run_cli):
    write_run(tmp_path / "alpha_run")
    write_run(tmp_path / "uniform_run", method="uniform", passes=False)
    out = tmp_path / "figs"
    done = run_cli(tmp_path / "alpha_run", tmp_path / "uniform_run", "--out", out)
    assert done.returncode == 0, done.stderr
    expected = ["alpha_run_alpha_heatmap.png", "alpha_run_decay_multiplier_heatmap.png", "alpha_run_type_means.png",
                "loss_and_eval_ppl.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    assert all(is_png(out / name) for name in expected)
    assert all(f"wrote {out / name}" in done.stdout for name in expected)
    # the uniform run has no module-wise pass: a note, not a traceback, and its curves are still drawn
    assert "note:" in done.stderr and "uniform_run: no module-wise decay pass" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_run_without_module_wise_pass_still_gets_its_curves(tmp_path, run_cli):
    write_run(tmp_path / "awd", method="awd", passes=False, partial_tail=False)
    done = run_cli(tmp_path / "awd", "--out", tmp_path / "figs")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "no module-wise decay pass" in done.stderr and "method is awd" in done.stderr
    assert [p.name for p in (tmp_path / "figs").iterdir()] == ["loss_and_eval_ppl.png"]


def test_adadecay_gets_the_heatmap_of_its_own_metric(tmp_path, run_cli):
    write_run(tmp_path / "ada", method="adadecay", metric="gradnorm")
    out = tmp_path / "figs"
    assert run_cli(tmp_path / "ada", "--out", out).returncode == 0
    assert is_png(out / "ada_gradnorm_heatmap.png") and is_png(out / "ada_decay_multiplier_heatmap.png")


def test_without_config_the_decay_is_plotted_unscaled(tmp_path, run_cli):
    write_run(tmp_path / "bare")
    (tmp_path / "bare" / "config.json").unlink()
    out = tmp_path / "figs"
    assert run_cli(tmp_path / "bare" / "metrics.jsonl", "--out", out).returncode == 0
    assert is_png(out / "bare_decay_heatmap.png") and is_png(out / "bare_alpha_heatmap.png")


def test_not_a_run_directory_is_a_clear_error(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        done = run_cli(path, "--out", tmp_path / "figs")
        assert done.returncode == 2 and done.stderr.startswith("error:") and "metrics.jsonl" in done.stderr
        assert "Traceback" not in done.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text("not json\n{}\n")
    done = run_cli(tmp_path / "bad", "--out", tmp_path / "figs")
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
    entry_point = subprocess.run([sys.executable, "-m", "alphadecay.plot", str(tmp_path / "empty"), "--out",
                                  str(tmp_path / "figs")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert entry_point.returncode == 2 and entry_point.stderr.startswith("error:")
    assert "Traceback" not in entry_point.stderr


def test_a_real_run_and_the_same_run_while_still_going(short_alphadecay_run, tmp_path):
    out = tmp_path / "figs"
    assert plot.main([str(short_alphadecay_run), "--out", str(out)]) == 0
    for name in ("run_alpha_heatmap.png", "run_decay_multiplier_heatmap.png", "run_type_means.png",
                 "loss_and_eval_ppl.png"):
        assert is_png(out / name), name
    run = plot.load_run(str(short_alphadecay_run))
    steps, names, multipliers = plot.module_series(run.events, "wd")
    assert steps == [1, 2, 4, 6, 8] and len(names) == 13  # passes at updates 0, 1, 3, 5, 7; 2 layers x 7 - 1
    assert np.nanmin(multipliers) / 0.1 == pytest.approx(0.666) and np.nanmax(multipliers) / 0.1 == pytest.approx(3.0)
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(short_alphadecay_run / "config.json", live)
    text = (short_alphadecay_run / "metrics.jsonl").read_text()
    (live / "metrics.jsonl").write_text(text[: len(text) * 2 // 3])  # cut in the middle of a line
    assert plot.main([str(live), "--out", str(tmp_path / "live_figs")]) == 0
    assert is_png(tmp_path / "live_figs" / "live_alpha_heatmap.png")


# -- python -m alphadecay.esd --plot -------------------------------------------------------------------------------
def test_esd_plot_of_a_run_directory(short_alphadecay_run, tmp_path, capsys):
    out = tmp_path / "esd"
    assert esd_main([str(short_alphadecay_run), "--plot", str(out), "--json", str(tmp_path / "esd.json")]) == 0
    rows = json.loads((tmp_path / "esd.json").read_text())["modules"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"esd_{r['name']}.png" for r in rows] + ["alpha_and_decay_by_module.png"])
    assert all(is_png(out / n) for n in names)
    printed = capsys.readouterr().out
    assert f"wrote {len(names)} figures to {out}" in printed and "mean alpha: attention (q,k,v,o)" in printed


def test_esd_figure_draws_the_fitted_power_law():
    rng = np.random.default_rng(0)
    eigs = np.sort((1 - rng.random(2000)) ** (-1 / 1.5))  # density ∝ λ^-2.5
    fig = plot.esd_figure("model.layers.0.mlp.up_proj", eigs, alpha=2.5, d=0.01, xmin=eigs[1000], n_tail=1000,
                          fit="median")
    ax = fig.axes[0]
    line = next(l for l in ax.get_lines() if l.get_label().startswith("power law"))
    x, y = line.get_data()
    assert x[0] == pytest.approx(eigs[1000]) and np.polyfit(np.log(x), np.log(y), 1)[0] == pytest.approx(-2.5)
    assert y[0] == pytest.approx(0.5 * 1.5 / eigs[1000])  # tail share x (α−1)/xmin at xmin
    assert "alpha 2.500" in ax.get_title() and "D 0.010" in ax.get_title() and "xmin" in ax.get_title()
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_esd_plot_of_an_initial_model_with_farms(tmp_path, capsys):
    out = tmp_path / "esd"
    assert esd_main([TINY_CONFIG, "--esd_estimator", "farms", "--plot", str(out), "--plot_modules", "head|1.mlp.up",
                     "--json", str(tmp_path / "f.json")]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha_and_decay_by_module_farms.png", "esd_farms_lm_head.png",
                                                     "esd_farms_model.layers.1.mlp.up_proj.png"]
    assert all(is_png(p) for p in out.iterdir())
    farms = json.loads((tmp_path / "f.json").read_text())["modules"]
    assert esd_main([TINY_CONFIG, "--json", str(tmp_path / "full.json")]) == 0
    full = json.loads((tmp_path / "full.json").read_text())["modules"]

    def gap(rows):
        mean = lambda kinds: np.mean([r["alpha"] for r in rows if r["name"].rsplit(".", 1)[-1] in kinds])
        return mean(("gate_proj", "up_proj", "down_proj")) - mean(("q_proj", "k_proj", "v_proj", "o_proj"))

    assert gap(full) > 0.5 and abs(gap(farms)) < 0.1  # llama_1m: 64x64 attention, 176x64 MLP
    assert "gap" in capsys.readouterr().out
