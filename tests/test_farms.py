"""FARMS (fixed-aspect-ratio submatrices, alphadecay.esd) and its wiring into the module-wise pass."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from alphadecay import esd
from alphadecay.config import parse_args
from alphadecay.errors import UserError
from alphadecay.model import build_model, load_model_config
from alphadecay.wd.groups import module_param_groups
from alphadecay.wd.scheduler import from_flags
from tests.conftest import TINY_CONFIG, free_port, train_args
from tests.test_esd import exact_eigs, gen, with_spectrum


def authors_windows(rows: int, cols: int, num_row_samples: int, q_ratio: float,
                    ops: int) -> list[tuple[int, int, int, int]]:
    """(row0, col0, n_rows, n_cols) of each window, transcribed from the authors' `fixed_sampling`
    (HUST-AI-HYZ/FARMS, LLM_Pruning/lib/sampling.py), on the (out, in) weight."""
    num_row_samples = min(num_row_samples, min(rows, cols))
    num_col_samples = int(num_row_samples * q_ratio)
    row_step = max(1, (rows - num_row_samples) // (ops - 1))
    col_step = max(1, (cols - num_col_samples) // (ops - 1))
    num_row_windows = min(ops, max(1, (rows - num_row_samples) // row_step + 1))
    num_col_windows = min(ops, max(1, (cols - num_col_samples) // col_step + 1))
    out = []
    for i in range(num_row_windows):
        for j in range(num_col_windows):
            row_start = min(i * row_step, rows - num_row_samples)
            col_start = min(j * col_step, cols - num_col_samples)
            out.append((row_start, col_start, num_row_samples, num_col_samples))
    return out


def our_windows(rows: int, cols: int, sampling: esd.FarmsSampling) -> list[tuple[int, int, int, int]]:
    """The same description of ours, mapped back to the (out, in) orientation."""
    (long, short), long_offsets, short_offsets = esd.farms_windows((rows, cols), sampling)
    tall = rows >= cols
    return [(r, c, long, short) if tall else (c, r, short, long) for r in long_offsets for c in short_offsets]


@pytest.mark.parametrize("shape, window, per_dim", [((1376, 512), 2000, 15), ((512, 1376), 2000, 15),
                                                    ((512, 512), 2000, 15), ((11008, 4096), 2000, 15),
                                                    ((4096, 4096), 2000, 15), ((300, 200), 64, 4),
                                                    ((200, 300), 100, 9), ((2048, 2048), 2000, 15)])
def test_square_window_positions_are_the_authors(shape, window, per_dim):
    """min_step 0: the authors' positions, all distinct (no window is pooled twice)."""
    ours = our_windows(*shape, esd.FarmsSampling(window, 1.0, per_dim, min_step=0))
    assert sorted(ours) == sorted(authors_windows(*shape, window, 1.0, per_dim))
    assert len(set(ours)) == len(ours)


# The square and MLP shapes of the paper's LLaMA 60M-1B, of the authors' LLaMA-7B/13B runs and of DeiT-tiny.
MODEL_SHAPES = [(512, 512), (1376, 512), (512, 1376), (768, 768), (2048, 768), (1024, 1024), (2736, 1024),
                (2048, 2048), (5461, 2048), (2048, 5461), (4096, 4096), (11008, 4096), (5120, 5120), (13824, 5120),
                (576, 192), (768, 192), (192, 768)]


def test_the_default_min_step_keeps_the_authors_positions_except_where_they_nearly_repeat():
    """At every model shape but llama_1b's the default positions are the authors'. Along 1B's 2048-wide sides the
    authors' 15 positions of a 2000-wide window are 3 apart (any two windows share >= 97.9% of their rows): the
    default keeps one (offset 0), 225 -> 1 window for a 2048² matrix and 225 -> 15 for 5461×2048."""
    authors, default = esd.FarmsSampling(min_step=0), esd.FarmsSampling()
    assert default.min_step == 0.05 and (default.window, default.aspect_ratio, default.per_dim) == (2000, 1.0, 15)
    for shape in MODEL_SHAPES:
        ours, theirs = esd.farms_windows(shape, default), esd.farms_windows(shape, authors)
        if shape not in ((2048, 2048), (5461, 2048), (2048, 5461)):
            assert ours == theirs, shape
    assert esd.farms_windows((2048, 2048), authors) == ((2000, 2000), list(range(0, 43, 3)), list(range(0, 43, 3)))
    assert esd.farms_windows((2048, 2048), default) == ((2000, 2000), [0], [0])
    long_offsets = list(range(0, 3459, 247))
    assert esd.farms_windows((5461, 2048), default) == ((2000, 2000), long_offsets, [0])
    assert esd.farms_windows((2048, 5461), default) == ((2000, 2000), long_offsets, [0])
    # the rule itself: neighbours >= ceil(min_step * window side) apart, as many as fit, from offset 0
    sampling = esd.FarmsSampling(100, 1.0, 9, min_step=0.25)
    assert esd.farms_windows((160, 110), sampling) == ((100, 100), [0, 25, 50], [0])  # authors': step 7 and 1
    assert esd.farms_windows((500, 110), sampling)[1] == list(range(0, 401, 50))  # the authors' step 50 >= 25


def test_min_step_drops_windows_not_precision():
    """Fewer windows, same sampling otherwise: the pooled ESD is the kept windows' own spectra."""
    w = torch.randn(200, 130, generator=gen(5)) * 0.02
    sampling = esd.FarmsSampling(120, 1.0, 6, min_step=0.2)
    (long, short), lo, so = esd.farms_windows(w.shape, sampling)
    assert (long, short, lo, so) == (120, 120, [0, 24, 48, 72], [0])  # authors': [0, 16, ..., 80] x [0, 1, ..., 5]
    pooled = esd.farms_eigenvalues([w], sampling)[0]
    windows = torch.sort(torch.cat([exact_eigs(w[r:r + 120, :120]) for r in lo])).values
    torch.testing.assert_close(pooled, windows, rtol=0, atol=1e-5 * windows[-1].item())


def test_windows_fit_the_matrix_and_keep_their_aspect_ratio():
    """Where the authors' slicing would run past the columns (in < rows·Q), ours shrinks the window instead."""
    for shape in [(100, 150), (150, 100), (1376, 512), (64, 64), (40, 400)]:
        for sampling in [esd.FarmsSampling(100, 2.0, 10), esd.FarmsSampling(64, 1.5, 3), esd.FarmsSampling(8, 4.0, 1)]:
            (long, short), long_offsets, short_offsets = esd.farms_windows(shape, sampling)
            assert short <= sampling.window and long == int(short * sampling.aspect_ratio)
            assert max(long_offsets) + long <= max(shape) and max(short_offsets) + short <= min(shape)
            assert len(long_offsets) <= sampling.per_dim and len(short_offsets) <= sampling.per_dim
    # the authors' code on a 100x150 weight with Q = 2: a 100x150 "window" (aspect 1.5), silently
    assert authors_windows(100, 150, 100, 2.0, 10)[0][3] == 200  # asks for 200 columns of 150
    assert esd.farms_windows((100, 150), esd.FarmsSampling(100, 2.0, 10))[0] == (150, 75)


@pytest.mark.parametrize("bad", [dict(window=0), dict(per_dim=0), dict(aspect_ratio=0.5), dict(aspect_ratio=math.nan),
                                 dict(min_step=-0.1), dict(min_step=math.nan), dict(min_step=math.inf)])
def test_bad_sampling_is_refused(bad):
    with pytest.raises(ValueError):
        esd.FarmsSampling(**bad)


def test_batched_eigenvalues_equal_the_per_window_loop():
    sampling = esd.FarmsSampling(48, 1.5, 4)
    weights = [torch.randn(n, m, generator=gen(i)) * 0.02 for i, (n, m) in
               enumerate([(64, 64), (176, 64), (64, 176), (200, 96), (96, 96)])]
    weights.append(with_spectrum(176, 64, torch.logspace(0, -3, 64, dtype=torch.float64), seed=7))
    weights.append(weights[1].bfloat16())
    copies = [w.clone() for w in weights]
    batched = esd.farms_eigenvalues(weights, sampling)
    for w, copy, e in zip(weights, copies, batched):
        assert torch.equal(w, copy)  # views only, the weights are untouched
        (long, short), lo, so = esd.farms_windows(w.shape, sampling)
        assert e.dtype == torch.float64 and e.shape == (len(lo) * len(so) * short,) and torch.all(e[1:] >= e[:-1])
        reference = esd.reference_farms_eigenvalues(w, sampling)
        torch.testing.assert_close(e, reference, rtol=0, atol=2e-5 * reference[-1].item())
        exact = torch.sort(torch.cat([exact_eigs(s.float()) for s in esd.farms_submatrices(w, sampling)])).values
        torch.testing.assert_close(e, exact, rtol=0, atol=1e-5 * exact[-1].item())


def test_pooled_esd_of_two_stacked_blocks_is_the_union_of_their_spectra():
    """W = [A; B] with square A, B and two windows per dimension: the windows are exactly A and B."""
    a = with_spectrum(64, 64, torch.linspace(0.1, 2.0, 64, dtype=torch.float64), seed=1)
    b = with_spectrum(64, 64, torch.arange(1, 65, dtype=torch.float64) ** -0.7, seed=2)
    w = torch.cat([a, b])
    sampling = esd.FarmsSampling(64, 1.0, 2)
    assert esd.farms_windows(w.shape, sampling) == ((64, 64), [0, 64], [0])
    pooled = esd.farms_eigenvalues([w], sampling)[0]
    union = torch.sort(torch.cat([exact_eigs(a), exact_eigs(b)])).values
    torch.testing.assert_close(pooled, union, rtol=0, atol=1e-5 * union[-1].item())
    fitted = esd.module_metrics([("w", w)], estimator="farms", farms=sampling)["w"]["alpha"]
    assert fitted == pytest.approx(esd.fit_power_law(union[None])[0].item(), rel=1e-4)


def test_a_square_matrix_inside_the_window_is_its_own_single_window():
    w = torch.randn(96, 96, generator=gen(3)) * 0.02
    full = esd.module_metrics([("w", w)])["w"]
    farms = esd.module_metrics([("w", w)], estimator="farms")["w"]
    assert farms == full  # every metric, alpha included, bit for bit


def test_farms_removes_the_aspect_ratio_gap_at_random_init():
    """Random N(0, 0.02) weights of the 60M model's two shapes (scaled down 2x): alpha of the whole matrix
    depends on the aspect ratio (~2.1 square, ~3.0 at 0.37); FARMS' square windows give both the square value."""
    attention = [(f"attn{i}", torch.randn(256, 256, generator=gen(10 + i)) * 0.02) for i in range(3)]
    mlp = [(f"mlp{i}", torch.randn(688, 256, generator=gen(20 + i)) * 0.02) for i in range(3)]
    mlp += [(f"down{i}", torch.randn(256, 688, generator=gen(30 + i)) * 0.02) for i in range(3)]

    def gap(**kwargs) -> float:
        stats = esd.module_metrics(attention + mlp, **kwargs)
        mean = {kind: sum(stats[n]["alpha"] for n, _ in group) / len(group)
                for kind, group in (("attn", attention), ("mlp", mlp))}
        return mean["mlp"] - mean["attn"]

    assert gap() > 0.7
    assert abs(gap(estimator="farms")) < 0.05
    assert abs(gap(estimator="farms", farms=esd.FarmsSampling(100, 1.0, 9))) < 0.05  # the authors' CV setting
    assert abs(gap(estimator="farms", farms=esd.FarmsSampling(64, 2.0, 5))) < 0.1  # non-square windows


def test_module_metrics_with_farms_matches_the_reference_pass():
    named = [(f"m{i}", torch.randn(n, m, generator=gen(40 + i)) * 0.02)
             for i, (n, m) in enumerate([(64, 64), (176, 64), (64, 176), (200, 96)])]
    named.append(("small", torch.randn(40, 30, generator=gen(49)) * 0.02))  # N = 30 < eigs_thresh
    sampling = esd.FarmsSampling(50, 1.0, 3)
    ours = esd.module_metrics(named, estimator="farms", farms=sampling)
    reference = esd.reference_module_metrics(named, estimator="farms", farms=sampling)
    for name, _ in named:
        for key in esd.METRIC_KEYS:
            a, b = ours[name][key], reference[name][key]
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-4), (name, key)
    assert math.isnan(ours["small"]["alpha"])
    # every fit method on the pooled ESD; the other metrics stay the whole matrix's. (The searches are compared on
    # the same eigenvalues: on random-init spectra their D minimum is flat enough for fp32 rounding to move it.)
    for fit in esd.FIT_METHODS:  # the searches get float64 eigenvalues (esd.SMALL_EIGENVALUE_FITS)
        gram_dtype = torch.float64 if fit in esd.SMALL_EIGENVALUE_FITS else None
        pooled = esd.farms_eigenvalues([w for _, w in named], sampling, gram_dtype=gram_dtype)
        ours = esd.module_metrics(named, fit=fit, estimator="farms", farms=sampling)
        full = esd.module_metrics(named, fit=fit)
        for (name, _), eigs in zip(named[:-1], pooled):
            alpha, d = esd.fit_power_law(eigs[None], method=fit)
            assert (ours[name]["alpha"], ours[name]["D"]) == (alpha.item(), d.item())
            for key in ("spectral_norm", "fnorm", "stable_rank", "entropy", "num_eigs"):
                assert ours[name][key] == pytest.approx(full[name][key], rel=1e-12)
    with pytest.raises(ValueError, match="estimator"):
        esd.module_metrics(named, estimator="windows")


def test_fitted_xmin_recovers_each_fits_xmin():
    eigs = torch.sort(torch.rand(300, generator=gen(50), dtype=torch.float64) ** -0.6).values
    for method in esd.FIT_METHODS:
        alpha = esd.fit_power_law(eigs[None], method=method)[0].item()
        xmin, n_tail = esd.fitted_xmin(eigs, alpha)
        i = len(eigs) - n_tail
        assert xmin == eigs[i].item()
        tail = eigs[i:]
        assert 1 + len(tail) / torch.log(tail / tail[0]).sum().item() == pytest.approx(alpha, rel=1e-12)
    assert esd.fitted_xmin(eigs, esd.fit_power_law(eigs[None])[0].item()) == (eigs[150].item(), 150)
    assert math.isnan(esd.fitted_xmin(eigs, math.nan)[0])


def test_the_config_flags_reach_the_module_wise_pass(tmp_path):
    config, _ = parse_args(train_args(tmp_path, wd_scheduler="alphadecay", esd_estimator="farms", farms_window=32,
                                      farms_windows_per_dim=3, farms_min_step=0.5))
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    groups = module_param_groups(model, config.weight_decay)
    decay = from_flags(config, model, torch.optim.AdamW(groups, lr=1e-3)).rule
    update = decay.step(0, model)
    modules = dict(model.named_modules())
    expected = esd.module_metrics([(n, modules[n].weight) for n in decay.modules], estimator="farms",
                                  farms=esd.FarmsSampling(32, 1.0, 3, 0.5))
    full = esd.module_metrics([(n, modules[n].weight) for n in decay.modules])
    for name in decay.modules:
        assert update.metrics[f"alpha/{name}"] == expected[name]["alpha"]
        assert update.metrics[f"alpha/{name}"] != full[name]["alpha"]
    default, _ = parse_args(train_args(tmp_path))
    assert (default.esd_estimator, default.farms_window, default.farms_aspect_ratio, default.farms_windows_per_dim,
            default.farms_min_step) == ("full", 2000, 1.0, 15, 0.05)
    for flag, value in (("farms_aspect_ratio", 0.5), ("farms_window", 0), ("farms_windows_per_dim", 0),
                        ("farms_min_step", -1)):
        with pytest.raises(UserError, match="farms"):
            parse_args(train_args(tmp_path, **{flag: value}))
    with pytest.raises(UserError, match="esd_estimator"):
        parse_args(train_args(tmp_path, esd_estimator="sliding"))


def _sharded_farms_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(esd.module_metrics(sharded_weights(), estimator="farms", farms=esd.FarmsSampling(40, 1.0, 3)),
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def sharded_weights() -> list[tuple[str, torch.Tensor]]:
    return [(f"m{i}", torch.randn(n, m, generator=gen(60 + i)) * 0.02)
            for i, (n, m) in enumerate([(64, 64), (176, 64), (64, 176), (200, 96), (96, 96)])]


def test_two_gloo_ranks_share_the_farms_pass(tmp_path):
    """The modules are shared out by their FARMS cost; every rank ends with the one-process result."""
    mp.spawn(_sharded_farms_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = esd.module_metrics(sharded_weights(), estimator="farms", farms=esd.FarmsSampling(40, 1.0, 3))
    assert rank0 == rank1 and list(rank0) == list(single)
    for name in single:
        assert all(rank0[name][k] == pytest.approx(single[name][k], rel=1e-6) for k in esd.METRIC_KEYS), name
