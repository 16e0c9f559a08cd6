"""alphadecay.esd: eigenvalues, power-law fits, side metrics and the (sharded) per-model pass, on CPU."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from alphadecay import esd
from alphadecay.esd import spectral
from tests.conftest import free_port

SHAPES = [(64, 64), (176, 64), (64, 176), (256, 96)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def with_spectrum(n: int, m: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """An n×m float32 matrix U diag(s) Vᵀ with the given singular values."""
    g = gen(seed)
    k = min(n, m)
    return ((orthonormal(n, k, g) * s) @ orthonormal(m, k, g).T).float()


def pareto(a: float, size: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Ascending samples with density ∝ x^-a on [scale, ∞)."""
    u = torch.rand(size, generator=gen(seed), dtype=torch.float64)
    return torch.sort(scale * (1 - u) ** (-1 / (a - 1))).values


def exact_eigs(w: torch.Tensor) -> torch.Tensor:
    return torch.sort(torch.linalg.svdvals(w.double()) ** 2).values


def make_spectra() -> torch.Tensor:
    """Rows of length 120: Marchenko-Pastur spectra of several aspect ratios, heavy tails, and a rank-deficient
    one (60 exact zeros) so that filter_zeros has something to drop."""
    rows = [exact_eigs(torch.randn(n, 120, generator=gen(i)) * 0.02) for i, n in enumerate((120, 200, 320, 600))]
    rows += [pareto(a, 120, seed=10 + i, scale=1e-3) for i, a in enumerate((1.8, 2.5, 4.0))]
    rows.append(torch.cat([torch.zeros(60, dtype=torch.float64), pareto(3.0, 60, seed=20)]))
    return torch.stack(rows)


def same(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel)


# -- the Hill estimator -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [2.0, 3.0, 4.0])
def test_median_hill_alpha_recovers_the_pareto_exponent(a):
    eigs = torch.stack([pareto(a, 4000, seed=s) for s in range(4)])
    alpha, d = esd.fit_power_law(eigs)
    assert torch.all((alpha - a).abs() / a < 0.04), alpha
    assert abs(alpha.mean().item() - a) / a < 0.02
    assert torch.all((d > 0) & (d < 0.05))
    for row, al, dd in zip(eigs, alpha.tolist(), d.tolist()):
        assert (al, dd) == pytest.approx(esd.reference_fit_power_law(row), rel=1e-10)


def test_median_fit_uses_xmin_pos_and_matches_the_closed_form():
    x = torch.arange(1, 101, dtype=torch.float64)[None]
    for xmin_pos in (2.0, 3.0, 1.5):
        i = int(100 / xmin_pos)
        tail = x[0, i:]
        expected = 1 + len(tail) / torch.log(tail / tail[0]).sum()
        alpha, _ = esd.fit_power_law(x, xmin_pos=xmin_pos)
        assert alpha.item() == pytest.approx(expected.item(), rel=1e-12)


# -- the searches: vectorised == the official loop ----------------------------------------------------------------
@pytest.mark.parametrize("filter_zeros", [False, True])
@pytest.mark.parametrize("method, official", [("goodness-of-fit", False), ("fix-finger", False),
                                              ("fix-finger", True), ("median", False)])
def test_vectorised_fits_equal_the_reference_loop(method, official, filter_zeros):
    eigs = make_spectra()
    kwargs = {"method": method, "filter_zeros": filter_zeros, "official_fix_finger": official}
    alpha, d = esd.fit_power_law(eigs, **kwargs)
    tiny_chunks = esd.fit_power_law(eigs, max_chunk_bytes=1, **kwargs)  # one candidate per chunk
    for k, row in enumerate(eigs):
        ref_alpha, ref_d = esd.reference_fit_power_law(row, **kwargs)
        assert same(alpha[k].item(), ref_alpha, 1e-10) and same(d[k].item(), ref_d, 1e-10), (k, alpha[k], ref_alpha)
    torch.testing.assert_close(tiny_chunks, (alpha, d), equal_nan=True, rtol=0, atol=0)


def test_fix_finger_windows_are_nested_and_the_official_lower_bound_is_void():
    """Candidates: corrected [0.95p, 1.5p] ⊂ official [log10(0.95p), 1.5p] ⊂ goodness-of-fit (all), so the minimum
    D can only fall along that chain; on this Marchenko-Pastur spectrum (density peak inside the bulk) the three
    choices differ."""
    eigs = exact_eigs(torch.randn(150, 100, generator=gen(2)))[None]
    correct = esd.fit_power_law(eigs, method="fix-finger")
    official = esd.fit_power_law(eigs, method="fix-finger", official_fix_finger=True)
    gof = esd.fit_power_law(eigs, method="goodness-of-fit")
    assert gof[1].item() <= official[1].item() <= correct[1].item()
    assert len({round(correct[0].item(), 6), round(official[0].item(), 6), round(gof[0].item(), 6)}) == 3


def test_filter_zeros_on_a_rank_deficient_matrix():
    w = (torch.randn(200, 40, generator=gen(5)) @ torch.randn(40, 100, generator=gen(6))) * 0.02
    eigs = esd.eigenvalues([w])[0][None]
    assert (eigs[0, :60] <= esd.EVALS_THRESH).all() and (eigs[0, 60:] > esd.EVALS_THRESH).all()
    for method in esd.FIT_METHODS:
        filtered = esd.fit_power_law(eigs, method=method, filter_zeros=True)
        nonzero = esd.fit_power_law(eigs[:, 60:], method=method)
        torch.testing.assert_close(filtered, nonzero, rtol=1e-12, atol=0)
        exact = esd.reference_fit_power_law(exact_eigs(w), method=method, filter_zeros=True)
        assert filtered[0].item() == pytest.approx(exact[0], rel=1e-4)
    unfiltered, _ = esd.fit_power_law(eigs)  # xmin at a rounding-level "zero": meaningless, but no exception
    assert math.isnan(unfiltered.item()) or unfiltered.item() != pytest.approx(filtered[0].item(), rel=1e-2)


def test_filter_zeros_falls_back_to_all_values_when_none_remain():
    eigs = torch.linspace(1e-7, 1e-6, 100, dtype=torch.float64)[None]
    torch.testing.assert_close(esd.fit_power_law(eigs, filter_zeros=True), esd.fit_power_law(eigs))


@pytest.mark.parametrize("method", esd.FIT_METHODS)
def test_invalid_spectra_give_nan_and_never_raise(method):
    rows = torch.stack([torch.full((80,), 0.3, dtype=torch.float64),  # all equal: α = inf
                        torch.zeros(80, dtype=torch.float64),  # nothing positive
                        torch.cat([torch.full((79,), 0.1), torch.tensor([math.nan])]).double(),  # NaN input
                        pareto(3.0, 80, seed=7)])  # a valid row in the same batch
    alpha, d = esd.fit_power_law(rows, method=method)
    assert torch.isnan(alpha[:3]).all() and torch.isnan(d[:3]).all()
    assert torch.isfinite(alpha[3]) and torch.isfinite(d[3])
    single = esd.fit_power_law(torch.tensor([[2.0]]), method=method)
    assert math.isnan(single[0].item()) and math.isnan(single[1].item())
    for row in rows[:3]:
        assert all(math.isnan(v) for v in esd.reference_fit_power_law(row, method=method))


# -- eigenvalues ---------------------------------------------------------------------------------------------------
def random_init_weights() -> list[torch.Tensor]:
    return [torch.randn(*shape, generator=gen(30 + i)) * 0.02 for i, shape in enumerate(SHAPES * 2)]


def heavy_tailed_weights() -> list[torch.Tensor]:
    out = []
    for i, (n, m) in enumerate(SHAPES):
        k = min(n, m)
        out.append(with_spectrum(n, m, torch.logspace(0, -4, k, dtype=torch.float64), seed=40 + i))  # 8 decades in λ
        out.append(with_spectrum(n, m, torch.logspace(1, -7, k, dtype=torch.float64), seed=50 + i))  # 16 decades
        out.append(with_spectrum(n, m, torch.arange(1, k + 1, dtype=torch.float64) ** -1.0, seed=60 + i))  # power law
    return out


@pytest.mark.parametrize("kind", ["random-init", "heavy-tailed"])
def test_gram_eigenvalues_give_the_float64_svd_alpha(kind):
    weights = random_init_weights() if kind == "random-init" else heavy_tailed_weights()
    copies = [w.clone() for w in weights]
    eigs = esd.eigenvalues(weights)
    for w, copy, e in zip(weights, copies, eigs):
        assert torch.equal(w, copy)  # the input is never modified
        exact = exact_eigs(w)
        assert e.dtype == torch.float64 and e.shape == (min(w.shape),) and torch.all(e[1:] >= e[:-1])
        assert (e - exact).abs().max() <= 1e-5 * exact[-1]
        got, want = esd.fit_power_law(e[None])[0].item(), esd.fit_power_law(exact[None])[0].item()
        assert abs(got - want) / want <= 1e-4, (tuple(w.shape), got, want)


def test_extreme_spread_is_recomputed_in_float64():
    w = with_spectrum(256, 96, torch.logspace(0, -5, 96, dtype=torch.float64), seed=70)  # λ_max/λ_med = 1e5
    auto = esd.eigenvalues([w])[0]
    fp32 = esd.eigenvalues([w], gram_dtype=torch.float32)[0]
    fp64 = esd.eigenvalues([w], gram_dtype=torch.float64)[0]
    assert torch.equal(auto, fp64) and not torch.equal(auto, fp32)


def test_bfloat16_weights_and_chunking():
    weights = [w.bfloat16() for w in random_init_weights()]
    copies = [w.clone() for w in weights]
    whole = esd.eigenvalues(weights)
    chunked = esd.eigenvalues(weights, max_chunk_bytes=1)  # one matrix per chunk
    for w, copy, e, c in zip(weights, copies, whole, chunked):
        assert w.dtype == torch.bfloat16 and torch.equal(w, copy)
        torch.testing.assert_close(e, c, rtol=1e-6, atol=1e-6 * e[-1].item())
        torch.testing.assert_close(e, exact_eigs(w.float()), rtol=0, atol=1e-5 * e[-1].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_blocked_gram_writes_every_entry(dtype):
    """N >= 512 takes the blocked path (products for the upper block rows, copies below): every entry of the
    output buffer is overwritten with aᵀa, none left as it was (NaN here, garbage from torch.empty in use)."""
    from alphadecay.esd.spectral import _gram

    for n, m in ((700, 512), (1100, 515)):
        a = (torch.randn(n, m, generator=gen(n + m), dtype=torch.float64) * 0.02).to(dtype)
        out = torch.full((m, m), math.nan, dtype=dtype)
        _gram(a, out)
        exact = a.double().T @ a.double()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), exact, rtol=0, atol=(1e-5 if dtype == torch.float32 else 1e-13)
                                   * exact.abs().max().item())


def test_non_finite_weights_give_nan_rows_and_never_raise():
    """A NaN or an infinity anywhere in a weight: that weight's eigenvalues and every metric are NaN (eigvalsh
    itself raises on such input), the other weights' are those of a pass without it, in one batch or alone."""
    clean = named_weights()
    bad = {"nan": torch.randn(176, 64, generator=gen(95)) * 0.02, "inf": torch.randn(64, 176, generator=gen(96)) * 0.02}
    bad["nan"][3, 5], bad["inf"][60, 1] = math.nan, math.inf
    named = clean[:3] + [("nan", bad["nan"])] + clean[3:] + [("inf", bad["inf"])]
    for gram_dtype in (None, torch.float32, torch.float64):
        eigs = dict(zip([n for n, _ in named], esd.eigenvalues([w for _, w in named], gram_dtype=gram_dtype)))
        assert torch.isnan(eigs["nan"]).all() and torch.isnan(eigs["inf"]).all()
        assert all(torch.isfinite(eigs[n]).all() for n, _ in clean)
    expected = esd.module_metrics(clean)
    for estimator in esd.ESD_ESTIMATORS:  # (every fit method gives NaN for a NaN row: test_invalid_spectra_...)
        got = esd.module_metrics(named, estimator=estimator, farms=esd.FarmsSampling(48, 1.0, 3))
        for name in bad:
            assert all(math.isnan(got[name][k]) for k in esd.METRIC_KEYS if k != "num_eigs"), (name, got[name])
            assert got[name]["num_eigs"] == 64
        if estimator == "full":
            assert all(got[n] == pytest.approx(expected[n], rel=1e-12, nan_ok=True) for n, _ in clean)


def test_cpu_worker_threads_restore_the_thread_count():
    threads = torch.get_num_threads()
    esd.eigenvalues(random_init_weights())
    assert torch.get_num_threads() == threads


# -- side metrics ----------------------------------------------------------------------------------------------
def test_spectral_metrics_on_known_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5] + [0.1] * 60, dtype=torch.float64)
    w = with_spectrum(100, 64, s, seed=80)
    eigs = esd.eigenvalues([w])[0][None]
    alpha = torch.tensor([2.5], dtype=torch.float64)
    got = esd.spectral_metrics(eigs, alpha)
    lam = s**2
    p = lam / lam.sum() + esd.ENTROPY_EPS
    expected = {
        "spectral_norm": 9.0,  # the SQUARED spectral norm, as the official "spectral_norm"
        "fnorm": lam.sum().item(),  # the squared Frobenius norm
        "stable_rank": lam.sum().item() / 9.0,
        "entropy": (-(p * p.log()).sum() / math.log(64 + esd.ENTROPY_EPS)).item(),
        "alphahat": math.log1p(math.exp(2.5 * math.log10(9.0))),
    }
    for key, value in expected.items():
        assert got[key].item() == pytest.approx(value, rel=1e-5), key


def test_alphahat_is_overflow_safe():
    big = esd.alphahat(torch.tensor([400.0], dtype=torch.float64), torch.tensor([1e10], dtype=torch.float64))
    assert big.item() == pytest.approx(4000.0)
    nonpositive = esd.alphahat(torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64))
    assert nonpositive.item() == pytest.approx(math.log1p(math.exp(-20.0)))  # safe_log10(0) = -10


# -- the per-model pass --------------------------------------------------------------------------------------------
def named_weights() -> list[tuple[str, torch.Tensor]]:
    weights = random_init_weights() + heavy_tailed_weights()[2::3]
    named = [(f"layers.{i}.proj", w) for i, w in enumerate(weights)]
    return named + [("small", torch.randn(40, 30, generator=gen(90)) * 0.02)]  # N = 30 < eigs_thresh


def test_module_metrics_matches_the_reference_pass():
    named = named_weights()
    ours = esd.module_metrics(named)
    reference = esd.reference_module_metrics(named)
    assert list(ours) == [n for n, _ in named]
    for name, row in ours.items():
        assert set(row) == set(esd.METRIC_KEYS)
        for key in esd.METRIC_KEYS:
            assert same(row[key], reference[name][key], 1e-4), (name, key, row[key], reference[name][key])
    assert all(math.isnan(ours["small"][k]) for k in ("alpha", "D", "alphahat"))
    assert ours["small"]["num_eigs"] == 30 and ours["small"]["spectral_norm"] > 0


def test_module_metrics_at_random_init_shows_the_aspect_ratio_effect():
    square = esd.module_metrics([("sq", torch.randn(512, 512, generator=gen(91)) * 0.02)])["sq"]["alpha"]
    mlp = esd.module_metrics([("mlp", torch.randn(1376, 512, generator=gen(92)) * 0.02)])["mlp"]["alpha"]
    assert square == pytest.approx(2.12, abs=0.03) and mlp == pytest.approx(3.0, abs=0.05)


def test_module_metrics_without_eigenvalues():
    w = torch.randn(30, 20, generator=gen(93))
    for fn in (esd.module_metrics, esd.reference_module_metrics):
        out = fn([("w", w)], need_eigs=False)
        assert out == {"w": {"fnorm": pytest.approx(w.double().square().sum().item()), "num_eigs": 20.0}}


def test_assign_owners_is_greedy_largest_first():
    costs = [5.0, 9.0, 1.0, 7.0, 3.0, 9.0]
    assert esd.assign_owners(costs, 1) == [0] * 6
    owners = esd.assign_owners(costs, 2)
    assert owners == [1, 0, 0, 0, 1, 1]  # 9→0, 9→1, 7→0 (tie: lowest rank), 5→1, 3→1 (14<16), 1→0 (16<17)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in (0, 1)]
    assert abs(loads[0] - loads[1]) <= max(costs)


def with_a_nan_weight() -> list[tuple[str, torch.Tensor]]:
    """named_weights() and a NaN-poisoned copy of the largest one (so that both ranks own modules)."""
    named = named_weights()
    poisoned = named[3][1].clone()
    poisoned[0, 0] = math.nan
    return named + [("poisoned", poisoned)]


def _out_of_memory(*args, **kwargs):
    raise MemoryError("rank 1 ran out")


def _sharded_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    torch_dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        result = {"metrics": esd.module_metrics(with_a_nan_weight())}
        # an error on one rank (here: rank 1's share raises, as out-of-memory would) reaches every rank
        real = spectral._metric_rows
        if rank == 1:
            spectral._metric_rows = _out_of_memory
        try:
            esd.module_metrics(named_weights())
        except (MemoryError, RuntimeError) as err:
            result["error"] = f"{type(err).__name__}: {err}"
        finally:
            spectral._metric_rows = real
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def test_two_gloo_ranks_return_identical_dicts_equal_to_one_process(tmp_path):
    """Also: a NaN weight is a NaN row on every rank, and an error on one rank is an error on all (no rank is
    left waiting in the gather)."""
    mp.spawn(_sharded_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = esd.module_metrics(named_weights())
    assert list(rank0["metrics"]) == list(single) + ["poisoned"]
    for name in single:
        assert all(same(rank0["metrics"][name][k], rank1["metrics"][name][k], 0) for k in esd.METRIC_KEYS)
        assert all(same(rank0["metrics"][name][k], single[name][k], 1e-6) for k in esd.METRIC_KEYS), name
    assert all(math.isnan(r["metrics"]["poisoned"]["alpha"]) for r in (rank0, rank1))
    assert rank1["error"] == "MemoryError: rank 1 ran out"
    assert rank0["error"].startswith("RuntimeError: the spectral pass failed on rank(s) 1 ")
