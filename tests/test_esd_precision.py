"""Fits that depend on the smallest eigenvalues (fix-finger, goodness-of-fit) get them accurately."""

import json

import pytest
import torch

from alphadecay import esd
from alphadecay.esd.report import main as esd_main
from tests.test_esd import exact_eigs, with_spectrum


def near_tie(rows: int = 256) -> torch.Tensor:
    """A rows×64 float32 matrix whose fix-finger modal bin is decided by the histogram's range, i.e. by λ_min.

    log10 λ: one value at -10 (λ_min: below a float32 Gram's resolution ~1e-7·λ_max), one at -6, ten spread over
    [-5, -3], cluster A = 20 values at -2, cluster B = 11 at -0.99 and 10 at -0.91, eleven over [-0.6, 0]. With the
    true range [-10, 0] the bins are 0.1 wide and B shares one bin (21 > 20: B is the peak); with a float32 Gram,
    λ_min becomes noise or 0 and the range starts at -7.5…-6, bins ≤ 0.075 wide split B (11, 10 < 20: A is the
    peak), and the xmin window moves a decade.
    """
    logs = [-10.0, -6.0, *torch.linspace(-5, -3, 10).tolist(), *[-2.0] * 20, *[-0.99] * 11, *[-0.91] * 10,
            *torch.linspace(-0.6, 0, 11).tolist()]
    singular_values = (10 ** torch.tensor(sorted(logs, reverse=True), dtype=torch.float64)).sqrt()
    return with_spectrum(rows, 64, singular_values, seed=1)


@pytest.mark.parametrize("official_fix_finger", [False, True])
def test_fix_finger_on_a_near_tie_gets_the_float64_svd_alpha(official_fix_finger):
    w = near_tie()
    exact = exact_eigs(w)  # float64 SVD of the float32 matrix
    fit = {"method": "fix-finger", "official_fix_finger": official_fix_finger}
    want = esd.fit_power_law(exact[None], **fit)[0].item()
    got = esd.module_metrics([("w", w)], fit="fix-finger", official_fix_finger=official_fix_finger)["w"]["alpha"]
    assert got == pytest.approx(want, rel=1e-9)
    # ... which is also what the official computation (float32 svdvals², its loop) gives here,
    official = esd.reference_module_metrics([("w", w)], fit="fix-finger", official_fix_finger=official_fix_finger)
    assert official["w"]["alpha"] == pytest.approx(want, rel=1e-6)
    # while float32 Gram eigenvalues flip the modal bin: the spectrum is a real near-tie.
    fp32 = esd.eigenvalues([w], gram_dtype=torch.float32)[0]
    assert abs(esd.fit_power_law(fp32[None], **fit)[0].item() - want) > 0.1 * want


def test_goodness_of_fit_uses_float64_eigenvalues():
    """Eight decades of singular values, λ_max/λ_median below the automatic float64 refinement's threshold."""
    w = with_spectrum(176, 64, torch.logspace(0, -4, 64, dtype=torch.float64), seed=41)
    exact = exact_eigs(w)
    assert exact[-1] / exact[len(exact) // 2] < esd.FP32_MAX_SPREAD
    want = esd.fit_power_law(exact[None], method="goodness-of-fit")[0].item()
    got = esd.module_metrics([("w", w)], fit="goodness-of-fit")["w"]["alpha"]
    assert got == pytest.approx(want, rel=1e-9)
    fp32 = esd.eigenvalues([w])[0]  # the float32 Gram the median fit keeps (accurate in the upper half)
    assert abs(esd.fit_power_law(fp32[None], method="goodness-of-fit")[0].item() - want) > 1e-4 * want
    median = esd.module_metrics([("w", w)], fit="median")["w"]["alpha"]
    assert median == pytest.approx(esd.fit_power_law(exact[None])[0].item(), rel=1e-5)


def test_esd_cli_takes_official_fix_finger(tmp_path, capsys):
    from alphadecay.model import build_model, load_model_config
    from tests.conftest import TINY_CONFIG

    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    with torch.no_grad():  # one Linear (64×176) with the near-tie spectrum
        model.model.layers[0].mlp.down_proj.weight.copy_(near_tie(rows=176).T)
    model.save_pretrained(tmp_path / "model")
    alphas = {}
    for flags in ([], ["--official_fix_finger"]):
        out = tmp_path / f"esd{len(flags)}.json"
        assert esd_main([str(tmp_path / "model"), "--pl_fitting", "fix-finger", *flags, "--json", str(out)]) == 0
        alphas[bool(flags)] = {r["name"]: r["alpha"] for r in json.loads(out.read_text())["modules"]}
        for name, module in model.named_modules():
            if name in alphas[bool(flags)]:
                eigs = exact_eigs(module.weight.detach())
                want = esd.fit_power_law(eigs[None], method="fix-finger", official_fix_finger=bool(flags))[0].item()
                assert alphas[bool(flags)][name] == pytest.approx(want, rel=1e-9), name
    capsys.readouterr()
    assert alphas[True] != alphas[False]  # the official bound changes some modules' alpha (2 of 15 here)
