"""Our power-law fits against independent implementations, on the same eigenvalues.

* the `powerlaw` package (Alstott et al.; PyPI 2.0.0, a test-only dependency in requirements.txt) with xmin held
  at our median fit's xmin: its continuous MLE alpha and KS distance D;
* WeightWatcher's default fit (`pl_package='ww'`), written here from its description (shared notes, "Cross-checking
  alpha with WeightWatcher"): eigenvalues <= 1e-5 dropped; for every candidate xmin, alpha = 1 + n / Σ ln(λ/xmin)
  over the n values >= xmin and the KS distance D; the smallest D wins. That is our goodness-of-fit.
Each on Pareto samples with a known exponent and on real weight spectra (a briefly trained 1.1M model).

powerlaw 2.0.0 bounds the power law's alpha to [0, 3] by default (`PowerLaw.DEFAULT_PARAMETER_RANGES`) and returns
3 with a warning for any steeper tail, e.g. the random-init MLP matrices (alpha ~3.0) or lm_head (~10); the fits
below pass parameter_ranges={"alpha": [1, 100]}.
"""

from __future__ import annotations

import warnings

import numpy as np
import powerlaw
import pytest
import torch

from alphadecay import esd
from alphadecay.esd.report import load_model
from alphadecay.wd.groups import linear_modules


def pareto(a: float, size: int, seed: int) -> np.ndarray:
    """Ascending samples with density ∝ x^-a on [1, ∞)."""
    return np.sort((1 - np.random.default_rng(seed).random(size)) ** (-1 / (a - 1)))


def powerlaw_fit(eigs: np.ndarray, xmin: float) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fit at the edge of its parameter range would warn: fail instead
        fit = powerlaw.Fit(eigs, xmin=xmin, verbose=False, parameter_ranges={"alpha": [1, 100]})
        return fit.power_law.alpha, fit.power_law.D


def weightwatcher_fit(eigs: np.ndarray) -> tuple[float, float]:
    """WeightWatcher's default power-law fit, one candidate xmin at a time."""
    x = np.sort(eigs[eigs > 1e-5])
    best_alpha, best_d = np.nan, np.inf
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / tail[0]))
        if not alpha > 1:
            continue
        d = np.max(np.abs(1 - (tail / tail[0]) ** (1 - alpha) - np.arange(n) / n))
        if d < best_d:
            best_alpha, best_d = alpha, d
    return best_alpha, best_d


def ours(eigs: np.ndarray, method: str) -> tuple[float, float, float]:
    """alpha, D and the xmin of our fit (goodness-of-fit with WeightWatcher's zero filter)."""
    x = torch.from_numpy(np.sort(eigs)).double()
    alpha, d = esd.fit_power_law(x[None], method=method, filter_zeros=method == "goodness-of-fit")
    return alpha.item(), d.item(), esd.fitted_xmin(x, alpha.item())[0]


@pytest.mark.parametrize("a", [2.0, 2.5, 3.5, 5.0])
def test_pareto_samples_with_a_known_exponent(a):
    x = pareto(a, 4000, seed=int(10 * a))
    alpha, d, xmin = ours(x, "median")
    assert xmin == x[2000] and abs(alpha - a) / a < 0.05
    assert powerlaw_fit(x, xmin) == pytest.approx((alpha, d), rel=1e-9)
    alpha, d, _ = ours(x, "goodness-of-fit")
    assert abs(alpha - a) / a < 0.1
    assert weightwatcher_fit(x) == pytest.approx((alpha, d), rel=1e-9)


def test_real_weight_spectra(short_alphadecay_run):
    model = load_model(str(short_alphadecay_run))  # its latest checkpoint, after 8 updates at lr 1e-2
    weights = [m.weight.detach() for _, m in linear_modules(model)]
    spectra = [e.numpy() for e in esd.eigenvalues(weights)]
    spectra += [e.numpy() for e in esd.farms_eigenvalues(weights[4:7], esd.FarmsSampling(32, 1.0, 4))]  # an MLP
    alphas = []
    for x in spectra:
        alpha, d, xmin = ours(x, "median")
        assert powerlaw_fit(x, xmin) == pytest.approx((alpha, d), rel=1e-9)
        alphas.append(alpha)
        alpha, d, _ = ours(x, "goodness-of-fit")
        assert weightwatcher_fit(x) == pytest.approx((alpha, d), rel=1e-9)
    assert max(alphas) > 3  # lm_head's steep tail: beyond powerlaw's default alpha range, so that case is covered
