"""Empirical spectral density (ESD) of weight matrices and the heavy-tail metrics AlphaDecay derives from it.

Reimplements `net_esd_estimator` and `matrix_entropy` of LLaMa-pretraining/WeightDecayUnbalance.py in
hed-ucas/AlphaDecay @23ce27c (cited below as "WDU.py:<line>"), with the same definitions but a different
computation:

* eigenvalues of WᵀW come from `eigvalsh` of the smaller-side Gram matrix, batched over matrices with the same
  N = min(n, m), instead of one fp32 `svdvals` per matrix (WDU.py:218-224);
* the goodness-of-fit and fix-finger searches over xmin are batched tensor ops instead of a Python loop with a
  host sync per candidate (WDU.py:259-291);
* the per-model pass can be shared out across ranks and all-gathered (the official code repeats it on every rank).

Definitions kept from the official code (N = min(n, m) eigenvalues λ_1 ≤ … ≤ λ_N, not normalised by N):
* Hill/MLE exponent over the tail starting at index i (k = N − i points, xmin = λ_i):
  α = 1 + k / Σ_{j≥i} ln(λ_j / λ_i);  KS distance D = max_{j≥i} |1 − (λ_j/λ_i)^(1−α) − (j − i)/k|.
* `spectral_norm` is λ_N, i.e. the SQUARED spectral norm; `fnorm` is Σλ, the SQUARED Frobenius norm.

Deliberate differences (each documented where it happens): fits run in float64; the fix-finger and
goodness-of-fit fits get float64 Gram eigenvalues (they depend on the smallest ones, see SMALL_EIGENVALUE_FITS);
an invalid fit returns NaN rather than the official's leftover value; the fix-finger lower bound is 0.95·p (the
official compares log10(0.95·p) against linear eigenvalues, kept behind `official_fix_finger=True`); the
fix-finger histogram ignores zero eigenvalues (the official one would receive log10(0) = -inf and fail).

`estimator="farms"` (not in the official code) fits alpha on the pooled ESD of fixed-aspect-ratio submatrices
instead of the whole matrix's: FARMS, Hu, Goel, Killiakov, Yang, ICML 2025, arXiv 2506.06280 (`farms_eigenvalues`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

EVALS_THRESH = 1e-5  # WDU.py:20, filter_zeros drops eigenvalues <= this
BINS = 100  # WDU.py:21, histogram bins of the fix-finger fit
EIGS_THRESH = 50  # WDU.py:28, modules with fewer eigenvalues are not fitted
ENTROPY_EPS = 6e-5  # WDU.py:313
FIT_METHODS = ("median", "goodness-of-fit", "fix-finger")
METRIC_KEYS = ("alpha", "alphahat", "D", "spectral_norm", "fnorm", "stable_rank", "entropy", "num_eigs")
# fp32 Gram eigenvalues are refined in fp64 when λ_max / λ_median exceeds this (see `eigenvalues`)
FP32_MAX_SPREAD = 1e4
# Fits that depend on the smallest eigenvalues, which a float32 Gram matrix gets only to ~eps32·λ_max absolute:
# fix-finger's histogram range starts at log10 λ_min, so the bin edges move and a near-tied modal bin flips
# (a random-init 512² matrix, λ_max/λ_min ~ 3e6: α off by 154%; tests/test_esd.py has a constructed near-tie);
# goodness-of-fit tries every xmin (α off by up to 1.5% on spectra spanning 8 decades below FP32_MAX_SPREAD,
# ≤ 5e-5 on 60M-like weights). They get float64 Gram eigenvalues, whose relative error at λ_min is
# ~eps64·λ_max/λ_min (better than the official fp32 svdvals², ~eps32·σ_max/σ_min). The median fit uses the
# upper half only: float32 is accurate there (≤ 4e-6 in α). Cost, the 55 tuned 60M matrices on the 2-core CPU
# under load: fix-finger 3.1 → 4.6 s, goodness-of-fit 3.7 → 4.8 s per pass (median 1.8-2.2 s, unchanged).
SMALL_EIGENVALUE_FITS = ("fix-finger", "goodness-of-fit")
FIT_CHUNK_BYTES = 64 * 2**20
# weight of eigvalsh's N³ against the Gram's n·m·N in the sharding cost (time per unit measured single-threaded on
# the 2-core CPU, 512² to 2048×768: 4.2-6.3; the (4/3)N³ of the tridiagonal reduction runs far below GEMM speed)
EIGH_WEIGHT = 5.0
ESD_ESTIMATORS = ("full", "farms")


# ---------------------------------------------------------------------------------------------------------------
# eigenvalues
# ---------------------------------------------------------------------------------------------------------------
def eigenvalues(weights: Sequence[torch.Tensor], *, gram_dtype: torch.dtype | None = None,
                max_chunk_bytes: int = 256 * 2**20) -> list[torch.Tensor]:
    """Eigenvalues of WᵀW (squared singular values, not normalised), ascending, float64, on each weight's device.

    Reproduces WDU.py:218-224 (`svdvals(W.float())²`, sorted) through the Gram matrix of the smaller side: the
    N×N Gram matrices of all weights with the same N (whatever the long side and orientation) are written into one
    (B, N, N) tensor, in chunks of at most `max_chunk_bytes`, and passed to a batched `eigvalsh`. Tiny negative
    eigenvalues (rounding) are clamped to 0. Inputs are never modified; no stacked copy of the weights is made
    (bf16 weights are cast one matrix at a time).

    gram_dtype=None (the default) computes the Gram product and eigvalsh in float32 and recomputes in float64
    the matrices whose λ_max / λ_median exceeds FP32_MAX_SPREAD = 1e4. Measured against float64 SVDs (512² to
    1376×512, log-spaced and power-law spectra): the fp32 Gram's α error is ≤ 1.3e-6 up to a spread of 1e4, but
    1e-5…2e-5 at 1e5, 5e-5 at 1e6 and 1e-3…2e-2 at 1e7 (its absolute error is ~eps32·λ_max). Random-init LLaMA
    weights have a spread of ~4-6 and trained ones far below 1e4, so the fp64 pass is the exception. An explicit
    gram_dtype is used for every matrix, with no refinement.
    """
    out: list[torch.Tensor | None] = [None] * len(weights)
    for idx in _group_by_size(weights).values():
        size = min(weights[idx[0]].shape)
        step = max(1, max_chunk_bytes // (2 * size * size * 8))  # the Gram tensor and eigvalsh's copy, in fp64
        for start in range(0, len(idx), step):
            chunk = idx[start:start + step]
            for i, eigs in zip(chunk, _batch_eigenvalues([weights[i] for i in chunk], gram_dtype)):
                out[i] = eigs
    return out  # type: ignore[return-value]


def _group_by_size(weights: Sequence[torch.Tensor]) -> dict[tuple, list[int]]:
    """Indices of the weights whose Gram matrices can share a batch: same N = min(n, m), same device."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weight {i} has shape {tuple(w.shape)}; expected a 2-D matrix")
        groups[(min(w.shape), w.device)].append(i)
    return groups


def _oriented(w: torch.Tensor) -> torch.Tensor:
    """A view with the long side first, so that AᵀA is the smaller Gram matrix."""
    return w if w.shape[0] >= w.shape[1] else w.mT


def _batch_eigenvalues(weights: list[torch.Tensor], gram_dtype: torch.dtype | None) -> torch.Tensor:
    """(B, N) ascending float64 eigenvalues of same-N weights, with the automatic fp64 refinement."""
    if gram_dtype is not None:
        return _gram_eigvalsh(weights, gram_dtype)
    eigs = _gram_eigvalsh(weights, torch.float32)
    spread = eigs[:, -1] / eigs[:, eigs.shape[1] // 2]
    redo = (~(spread <= FP32_MAX_SPREAD)).nonzero().flatten().tolist()  # also catches inf and NaN spreads
    if redo:
        eigs[redo] = _gram_eigvalsh([weights[i] for i in redo], torch.float64)
    return eigs


def _gram_eigvalsh(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """(B, N) ascending float64 eigenvalues of the N×N Gram matrices of same-N weights, computed in `dtype`.

    On a multi-threaded CPU the matrices are dealt round-robin to that many single-threaded worker threads, each
    forming its Grams and calling eigvalsh: LAPACK's tridiagonal reduction hardly uses a second thread (1.1× on
    2 cores for 512²), whereas separate matrices on separate threads scale linearly. Each worker calls
    torch.set_num_threads(1), which sets its own OpenMP/MKL thread counts and torch's process-wide default, so
    the caller's count is restored afterwards.
    """
    caller_threads = torch.get_num_threads()
    workers = min(caller_threads, len(weights))
    if weights[0].device.type != "cpu" or workers == 1:
        return _serial_gram_eigvalsh(weights, dtype)
    try:
        with ThreadPoolExecutor(workers) as pool:
            shares = [weights[i::workers] for i in range(workers)]
            parts = list(pool.map(_single_threaded_gram_eigvalsh, shares, [dtype] * workers))
    finally:
        torch.set_num_threads(caller_threads)
    out = torch.empty(len(weights), parts[0].shape[1], dtype=torch.float64)
    for i, part in enumerate(parts):
        out[i::workers] = part
    return out


def _single_threaded_gram_eigvalsh(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    torch.set_num_threads(1)
    return _serial_gram_eigvalsh(weights, dtype)


def _serial_gram_eigvalsh(weights: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """UPLO="U": LAPACK's reduction of the upper triangle (in torch's layout) measured 12-17% faster on this CPU."""
    size = min(weights[0].shape)
    gram = torch.empty(len(weights), size, size, dtype=dtype, device=weights[0].device)
    for g, w in zip(gram, weights):
        _gram(_oriented(w).to(dtype), g)
    return gram_eigenvalues(gram, uplo="U")


def gram_eigenvalues(gram: torch.Tensor, uplo: str = "L") -> torch.Tensor:
    """Ascending float64 eigenvalues (clamped at 0) of each Gram matrix in `gram` (..., N, N), overwritten.

    A Gram with a NaN or an infinity (a non-finite weight, or a product that overflowed its dtype) gets a row of
    NaN: it is zeroed before eigvalsh, which raises on non-finite input (on CUDA too, where the error surfaces at
    the next synchronisation), and its eigenvalues are replaced afterwards; no host synchronisation."""
    bad = ~torch.isfinite(gram).flatten(-2).all(dim=-1)
    gram.masked_fill_(bad[..., None, None], 0)
    eigs = torch.linalg.eigvalsh(gram, UPLO=uplo).clamp_(min=0).to(torch.float64)
    return eigs.masked_fill_(bad[..., None], math.nan)


def _gram(a: torch.Tensor, out: torch.Tensor, min_block: int = 128) -> None:
    """aᵀa into `out`, every entry written, in ~2/3 of the full product's flops.

    out[:h] = a[:, :h]ᵀ a gives the top block rows, the block below the diagonal is the transpose of the one
    above it (a copy, not a product), and the bottom-right block recurses. eigvalsh(UPLO="U") reads only the
    upper triangle, but nothing is left uninitialised: a solver that read the whole matrix, or a finiteness
    check of it, sees aᵀa (symmetric up to the rounding of the diagonal blocks' products).
    """
    n = a.shape[1]
    if n <= min_block:
        torch.matmul(a.mT, a, out=out)
        return
    half = n // 2
    torch.matmul(a[:, :half].mT, a, out=out[:half])
    out[half:, :half].copy_(out[:half, half:].mT)
    _gram(a[:, half:], out[half:, half:], min_block)


# ---------------------------------------------------------------------------------------------------------------
# FARMS: the ESD of fixed-aspect-ratio submatrices
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FarmsSampling:
    """How FARMS (Hu et al., ICML 2025, arXiv 2506.06280) cuts a weight matrix into submatrices.

    Defaults are the authors' LLaMA-7B/13B pruning runs (HUST-AI-HYZ/FARMS @8e07c3f,
    LLM_Pruning/scripts/llm_pruning_main.txt: num_row_samples 2000, Q_ratio 1, sampling_ops_per_dim 15):
    square 2000×2000 windows, 15 window positions along each dimension. Their code's own function defaults
    (100 rows, Q_ratio 2, 10 positions) are used by none of their published runs; their image-classification
    runs use 100×100 windows and 9 positions.

    window: the short side of each submatrix (the authors' num_row_samples), capped to what fits the matrix;
    aspect_ratio: long side / short side of each submatrix, >= 1 (the authors' Q_ratio);
    per_dim: window positions along each dimension (the authors' sampling_ops_per_dim);
    min_step: neighbouring positions along a side are at least ⌈min_step × the window's side⌉ apart, so fewer
    positions where the matrix is barely larger than the window (not in the authors' code; 0 = their positions,
    see `farms_windows`).
    """

    window: int = 2000
    aspect_ratio: float = 1.0
    per_dim: int = 15
    min_step: float = 0.05

    def __post_init__(self) -> None:
        if self.window < 1 or self.per_dim < 1 or not self.aspect_ratio >= 1 or not 0 <= self.min_step < math.inf:
            raise ValueError(f"FARMS needs window >= 1, per_dim >= 1, aspect_ratio >= 1 and a finite min_step >= 0; "
                             f"got {self}")

    @classmethod
    def from_flags(cls, flags) -> FarmsSampling:
        """From a run configuration or parsed command line with the --farms_* flags."""
        return cls(flags.farms_window, flags.farms_aspect_ratio, flags.farms_windows_per_dim, flags.farms_min_step)


def farms_windows(shape: Sequence[int], sampling: FarmsSampling) -> tuple[tuple[int, int], list[int], list[int]]:
    """Submatrix size (long, short) and its offsets along the long and the short side of a matrix of `shape`.

    Positions follow the authors' `fixed_sampling` (LLM_Pruning/lib/sampling.py): along a side of length n with
    window size w, span = n − w, step = max(1, span // (per_dim − 1)), min(per_dim, span // step + 1) windows
    starting at i·step (never past the span, so their positions are all distinct: no window is repeated). Three
    deliberate differences, the first two inert for the default square windows:
    * the window is laid with its long side along the matrix's long side, and its short side is capped so that
      the whole window fits (short = min(window, n_short, ⌊n_long / aspect_ratio⌋)); the authors' code takes
      rows × (rows·Q) of the (out, in) weight, capping rows at min(out, in), and silently gets fewer columns
      when in < rows·Q, i.e. a window of another aspect ratio;
    * per_dim = 1 is one window at offset 0 (the authors' step formula divides by per_dim − 1);
    * the step is at least ⌈min_step·w⌉ (default 0.05: neighbours share at most 95% of their rows, or columns),
      so a side barely longer than the window gets fewer positions, and one (offset 0) when span < ⌈min_step·w⌉.
      The authors' step of 1 to a few rows gives nearly identical windows, each an eigendecomposition: a 2048²
      matrix under 2000² windows has 15 positions 3 apart per side, 225 windows sharing ≥ 95% of their entries.
      min_step = 0 gives their positions. The default changes nothing where the step is ≥ 5% of the window: the
      paper's LLaMA 60M-350M (steps ≥ 11.8% of the window), 1B's long sides, the authors' 7B/13B runs (≥ 7.4%).
    With the default, a square matrix no larger than 2000 is its own single window, so FARMS equals the full ESD
    there, and a 1376×512 MLP matrix gives 15 overlapping 512×512 windows.
    """
    n_long, n_short = max(shape), min(shape)
    short = min(sampling.window, n_short, int(n_long / sampling.aspect_ratio))
    long = int(short * sampling.aspect_ratio)
    offsets = [_window_offsets(n, size, sampling.per_dim, sampling.min_step) for n, size in ((n_long, long),
                                                                                            (n_short, short))]
    return (long, short), offsets[0], offsets[1]


def _window_offsets(n: int, size: int, per_dim: int, min_step: float = 0.0) -> list[int]:
    span = n - size
    if per_dim == 1 or span == 0:
        return [0]
    step = max(1, math.ceil(min_step * size), span // (per_dim - 1))
    return [i * step for i in range(min(per_dim, span // step + 1))]


def farms_submatrices(w: torch.Tensor, sampling: FarmsSampling) -> list[torch.Tensor]:
    """The FARMS windows of `w` as views (no copy), oriented long side first."""
    (long, short), long_offsets, short_offsets = farms_windows(w.shape, sampling)
    a = _oriented(w)
    return [a[r:r + long, c:c + short] for r in long_offsets for c in short_offsets]


def farms_eigenvalues(weights: Sequence[torch.Tensor], sampling: FarmsSampling = FarmsSampling(), *,
                      gram_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per weight, the eigenvalues of all its FARMS windows pooled: ascending float64, on the weight's device.

    Every window of a weight has the same size, so the pooled sample's empirical density is the average of the
    windows' densities: the "average ESD" FARMS fits (the authors concatenate and sort the windows' squared
    singular values, sampling.py `fixed_sampling`). The windows of all weights are one list for `eigenvalues`,
    which batches those of equal size (all the MLP windows of a model share one batched eigvalsh) with its fp32 /
    fp64 rule; the authors call fp32 `svdvals` once per window.
    """
    windows, owner = [], []
    for i, w in enumerate(weights):
        parts = farms_submatrices(w.detach(), sampling)
        windows += parts
        owner += [i] * len(parts)
    eigs = eigenvalues(windows, gram_dtype=gram_dtype)
    pooled: list[list[torch.Tensor]] = [[] for _ in weights]
    for i, e in zip(owner, eigs):
        pooled[i].append(e)
    return [torch.sort(torch.cat(parts)).values for parts in pooled]


def reference_farms_eigenvalues(w: torch.Tensor, sampling: FarmsSampling = FarmsSampling()) -> torch.Tensor:
    """The authors' per-window loop (`fixed_sampling`): fp32 svdvals² of each window, concatenated and sorted.
    A test oracle for `farms_eigenvalues`; window positions from `farms_windows`."""
    (long, short), long_offsets, short_offsets = farms_windows(w.shape, sampling)
    a = _oriented(w.detach().to(torch.float32))
    parts = [torch.linalg.svdvals(a[r:r + long, c:c + short]).square() for r in long_offsets for c in short_offsets]
    return torch.sort(torch.cat(parts).to(torch.float64)).values


# ---------------------------------------------------------------------------------------------------------------
# power-law fits
# ---------------------------------------------------------------------------------------------------------------
def fit_power_law(eigs: torch.Tensor, *, method: str = "median", xmin_pos: float = 2.0, filter_zeros: bool = False,
                  official_fix_finger: bool = False, max_chunk_bytes: int = FIT_CHUNK_BYTES
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hill exponent α and KS distance D of each row of `eigs` (B, N), ascending; returns two float64 (B,) tensors.

    methods (WDU.py:250-291):
    * "median": xmin = λ_i with i = int(N / xmin_pos), the median for xmin_pos = 2 (WDU.py:250-258);
    * "goodness-of-fit": every xmin candidate λ_0 … λ_{N-2}; the one with the smallest D among those with α > 1
      (WDU.py:259-291; first index on ties, as torch.argmin);
    * "fix-finger": the same search restricted to 0.95·p ≤ xmin ≤ 1.5·p, p = 10^(left edge of the modal bin of a
      100-bin histogram of log10 λ) (WDU.py:262-278). official_fix_finger=True uses the official lower bound
      log10(0.95·p) (WDU.py:270), a log value compared against linear eigenvalues, i.e. practically no bound.

    filter_zeros drops eigenvalues <= 1e-5, falling back to all of them when none remain (WDU.py:237-246). As the
    rows are ascending, the kept values of each row are a suffix, so the batch stays rectangular: each row only
    gets its own first index. Searches run over (B, candidates, N) blocks of at most `max_chunk_bytes`, with one
    host sync per fit call. Invalid fits (non-finite input, fewer than 2 values, degenerate or all-equal spectra,
    no candidate with α > 1) give NaN for both α and D; nothing raises.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"unknown power-law fit {method!r}; expected one of {FIT_METHODS}")
    x = eigs.to(torch.float64)
    bad = ~torch.isfinite(x).all(dim=1) | (x.shape[1] < 2)
    x = torch.where(bad[:, None], torch.ones_like(x), x)  # an all-equal placeholder row: computes, then NaN
    start = _first_kept(x, filter_zeros)
    if method == "median":
        alpha, d = _median_fit(x, start, xmin_pos)
    else:
        lo, hi = _candidate_window(x, start, method, official_fix_finger)
        alpha, d = _best_candidate(x, lo, hi, max_chunk_bytes)
    invalid = bad | ~torch.isfinite(alpha) | ~torch.isfinite(d)
    nan = torch.full_like(alpha, math.nan)
    return torch.where(invalid, nan, alpha), torch.where(invalid, nan, d)


def _first_kept(x: torch.Tensor, filter_zeros: bool) -> torch.Tensor:
    """Index of each row's first eigenvalue that the fit keeps (WDU.py:237-246)."""
    if not filter_zeros:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    dropped = (x <= EVALS_THRESH).sum(dim=1)
    return torch.where(dropped == x.shape[1], 0, dropped)


def _log_suffix_sums(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ln λ and Σ_{j≥i} ln λ_j for every i (accumulated from the top, so zeros below i do not matter)."""
    logs = torch.log(x)
    return logs, logs.flip(1).cumsum(1).flip(1)


def _hill(logs: torch.Tensor, suffix: torch.Tensor, idx: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """α = 1 + n / (Σ_{j≥i} ln λ_j − n ln λ_i) at indices idx (B, C) with tail sizes n (WDU.py:255, :282)."""
    return 1 + n / (suffix.gather(1, idx) - n * logs.gather(1, idx))


def _ks_distance(x: torch.Tensor, idx: torch.Tensor, alpha: torch.Tensor, first_col: int) -> torch.Tensor:
    """D for candidates idx (B, C) with exponents alpha (B, C), over columns first_col… (WDU.py:256-258, :285-287).

    Uses (λ_j / λ_i)^(1−α) like the official code, so that α = inf with λ_j = λ_i gives 1, not NaN.
    """
    n_total = x.shape[1]
    cols = torch.arange(first_col, n_total, device=x.device)
    xmin = x.gather(1, idx)
    n = (n_total - idx).to(x.dtype)
    cdf = (x[:, None, first_col:] / xmin[..., None]).pow_((1 - alpha)[..., None])
    rank = (cols - idx[..., None]).to(x.dtype) / n[..., None]
    gap = cdf.neg_().add_(1).sub_(rank).abs_()
    return gap.masked_fill_(cols < idx[..., None], 0).amax(dim=2)


def _median_fit(x: torch.Tensor, start: torch.Tensor, xmin_pos: float) -> tuple[torch.Tensor, torch.Tensor]:
    """xmin at the row's kept index start + int(N_kept / xmin_pos) (WDU.py:251)."""
    n_total = x.shape[1]
    kept = (n_total - start).to(torch.float64)
    idx = (start + torch.floor(kept / xmin_pos).long())[:, None]
    out_of_range = (idx[:, 0] >= n_total) | (idx[:, 0] < 0)
    idx = idx.clamp(0, n_total - 1)
    logs, suffix = _log_suffix_sums(x)
    n = (n_total - idx).to(x.dtype)
    alpha = _hill(logs, suffix, idx, n)
    d = _ks_distance(x, idx, alpha, 0)[:, 0]
    alpha = alpha[:, 0].masked_fill(out_of_range, math.nan)
    return alpha, d


def _candidate_window(x: torch.Tensor, start: torch.Tensor, method: str, official_fix_finger: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive index range [lo, hi] of the xmin candidates of each row (the official loop over nz_eigs[:-1]);
    an empty range (lo > hi) when a fix-finger row has no histogram peak."""
    hi = torch.full_like(start, x.shape[1] - 2)
    if method == "goodness-of-fit":
        return start, hi
    peak = _histogram_peak(x, start)
    lower = torch.log10(0.95 * peak) if official_fix_finger else 0.95 * peak
    lo = torch.searchsorted(x, lower[:, None].contiguous(), side="left")[:, 0]
    top = torch.searchsorted(x, (1.5 * peak)[:, None].contiguous(), side="right")[:, 0] - 1
    top = torch.where(torch.isnan(peak), -1, torch.minimum(top, hi))
    return torch.maximum(lo, start), top


def _histogram_peak(x: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """p = 10^(left edge of the fullest of 100 equal bins of log10 λ over the kept positive values (WDU.py:263-269).

    Bins as torch.histc: [min, max] split evenly, the maximum in the last bin, min == max widened to ±1; the first
    fullest bin wins, as torch.argmax. Rows with no positive kept value give NaN (no candidate).
    """
    cols = torch.arange(x.shape[1], device=x.device)
    used = (x > 0) & (cols >= start[:, None])
    logs = torch.log10(x)
    low = torch.where(used, logs, math.inf).amin(dim=1)
    high = logs[:, -1]
    flat = low == high
    low, high = torch.where(flat, low - 1, low), torch.where(flat, high + 1, high)
    width = high - low
    pos = ((logs - low[:, None]) / width[:, None] * BINS).floor().clamp(0, BINS - 1)
    bins = torch.where(used, pos, BINS).long()  # unused values go to a discarded extra bin
    counts = torch.zeros(x.shape[0], BINS + 1, dtype=x.dtype, device=x.device).scatter_add_(1, bins, torch.ones_like(x))
    peak_bin = counts[:, :BINS].argmax(dim=1)
    peak = 10 ** (low + peak_bin * width / BINS)
    return torch.where(used.any(dim=1), peak, math.nan)


def _best_candidate(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, max_chunk_bytes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate with the smallest D among those in [lo, hi] with α > 1 (WDU.py:273-291).

    As in the official code, a candidate outside the window or with α ≤ 1 (or NaN) has D = 1; if none is valid the
    official code returns alphas[0] (0 or an α ≤ 1), here NaN. Chunks over candidates keep the first minimum.
    """
    batch, n_total = x.shape
    first, last = int(lo.min()), int(hi.max())  # the one host sync of the search
    best_d = torch.full((batch,), math.inf, dtype=x.dtype, device=x.device)
    best_alpha = torch.full_like(best_d, math.nan)
    if last < first:
        return best_alpha, best_d
    logs, suffix = _log_suffix_sums(x)
    per_candidate = batch * (n_total - first) * x.element_size() * 3
    step = max(1, max_chunk_bytes // per_candidate)
    for c0 in range(first, last + 1, step):
        cand = torch.arange(c0, min(c0 + step, last + 1), device=x.device).expand(batch, -1)
        alpha = _hill(logs, suffix, cand, (n_total - cand).to(x.dtype))
        valid = (cand >= lo[:, None]) & (cand <= hi[:, None]) & (alpha > 1)
        d = torch.where(valid, _ks_distance(x, cand, alpha, c0), 1.0)
        k = d.argmin(dim=1, keepdim=True)  # the first minimum in the chunk, as the official torch.argmin
        chunk_d = d.gather(1, k)[:, 0]
        better = chunk_d < best_d
        best_d = torch.where(better, chunk_d, best_d)
        best_alpha = torch.where(better, alpha.gather(1, k)[:, 0], best_alpha)
    none_valid = best_d >= 1
    return best_alpha.masked_fill(none_valid, math.nan), best_d.masked_fill(none_valid, math.nan)


def fitted_xmin(eigs: torch.Tensor, alpha: float) -> tuple[float, int]:
    """xmin and tail size of the fit that gave `alpha` on the ascending 1-D spectrum `eigs` (for plots).

    `fit_power_law` returns α and D only; every fit method takes its α from the Hill formula at one candidate
    index, so the candidate whose Hill α is closest to `alpha` is that index. (nan, 0) for a NaN alpha.
    """
    x = eigs.detach().to(torch.float64).cpu()[None]
    if not math.isfinite(alpha) or x.shape[1] < 2:
        return math.nan, 0
    logs, suffix = _log_suffix_sums(x)
    idx = torch.arange(x.shape[1] - 1)[None]
    hill = _hill(logs, suffix, idx, (x.shape[1] - idx).to(x.dtype))[0]
    i = int(torch.nan_to_num((hill - alpha).abs(), nan=math.inf).argmin())
    return x[0, i].item(), x.shape[1] - i


# ---------------------------------------------------------------------------------------------------------------
# side metrics
# ---------------------------------------------------------------------------------------------------------------
def spectral_metrics(eigs: torch.Tensor, alpha: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-row metrics of ascending eigenvalues (B, N), float64 (WDU.py:225-228, :295-296, :312-319).

    spectral_norm: λ_max, the SQUARED spectral norm (official name and meaning); fnorm: Σλ, the SQUARED Frobenius
    norm; stable_rank: Σλ / λ_max; entropy: the official normalised matrix entropy
    −Σ p ln p / ln(rank + ε), p = λ/Σλ + ε, rank = #{√λ > ε}, ε = 6e-5 (over all eigenvalues, unfiltered).
    With `alpha` (B,), also alphahat = softplus(α · log10 λ_max) (log10 of a non-positive λ_max taken as −10).
    """
    x = eigs.to(torch.float64)
    top = x[:, -1]
    total = x.sum(dim=1)
    p = x / total[:, None] + ENTROPY_EPS
    rank = (x.sqrt() > ENTROPY_EPS).sum(dim=1).to(torch.float64)
    out = {
        "spectral_norm": top,
        "fnorm": total,
        "stable_rank": total / top,
        "entropy": -(p * torch.log(p)).sum(dim=1) / torch.log(rank + ENTROPY_EPS),
    }
    if alpha is not None:
        out["alphahat"] = alphahat(alpha, top)
    return out


def alphahat(alpha: torch.Tensor, spectral_norm: torch.Tensor) -> torch.Tensor:
    """softplus(α · log10 spectral_norm), overflow-safe (WDU.py:295-296 and safe_log10 at :11-14)."""
    safe_log = torch.where(spectral_norm > 0, torch.log10(spectral_norm.clamp(min=1e-300)), -10.0)
    return torch.logaddexp(torch.zeros_like(alpha), alpha.to(torch.float64) * safe_log)


# ---------------------------------------------------------------------------------------------------------------
# the per-model pass
# ---------------------------------------------------------------------------------------------------------------
def module_metrics(named_weights: Sequence[tuple[str, torch.Tensor]], *, need_eigs: bool = True,
                   fit: str = "median", xmin_pos: float = 2.0, filter_zeros: bool = False,
                   official_fix_finger: bool = False, eigs_thresh: int = EIGS_THRESH,
                   process_group: dist.ProcessGroup | None = None, estimator: str = "full",
                   farms: FarmsSampling = FarmsSampling()) -> dict[str, dict[str, float]]:
    """{name: {alpha, alphahat, D, spectral_norm, fnorm, stable_rank, entropy, num_eigs}} as Python floats.

    The metrics of `net_esd_estimator` (WDU.py:197-310) for the given weights. alpha, alphahat and D are NaN where
    the fit is invalid or the module has fewer than eigs_thresh eigenvalues (the official code drops such modules,
    WDU.py:83-86); the other metrics are always reported.

    With torch.distributed initialised and more than one rank in `process_group` (default: the world), the
    modules are shared out by cost (`assign_owners`), each rank computes its share, and one all_gather of a
    float64 (modules × metrics) tensor gives every rank the identical dict. The gather tensor lives on the
    current CUDA device for NCCL and on the CPU otherwise. Every rank must call this with the same names and
    shapes (as with DDP replicas).

    need_eigs=False computes nothing spectral: each module gets only {"fnorm": ‖W‖_F², "num_eigs": min(n, m)},
    computed locally on every rank (replicas hold identical weights, so no communication).

    estimator="farms" fits alpha and D (and so alphahat) on the pooled ESD of the `farms` windows
    (`farms_eigenvalues`) instead of the whole matrix's; every other metric, num_eigs and the eigs_thresh test
    still describe the whole matrix, so the set of fitted modules does not depend on the estimator.
    """
    if estimator not in ESD_ESTIMATORS:
        raise ValueError(f"unknown ESD estimator {estimator!r}; expected one of {ESD_ESTIMATORS}")
    names = [name for name, _ in named_weights]
    weights = [w.detach() for _, w in named_weights]
    if not need_eigs:
        return {n: {"fnorm": float(w.double().square().sum()), "num_eigs": float(min(w.shape))}
                for n, w in zip(names, weights)}
    fit_kwargs = {"method": fit, "xmin_pos": xmin_pos, "filter_zeros": filter_zeros,
                  "official_fix_finger": official_fix_finger}
    rank, world = _rank_and_world(process_group)
    farms_sampling = farms if estimator == "farms" else None
    owners = assign_owners([_cost(w, farms_sampling) for w in weights], world)
    mine = [i for i, owner in enumerate(owners) if owner == rank]
    if world == 1:
        rows = _metric_rows(weights, eigs_thresh, fit_kwargs, farms_sampling)
    else:
        # Every rank must reach the all_gather, or the others wait there until the process group's timeout: an
        # error here (non-finite weights give NaN rows and raise nothing, but memory can run out) is sent along
        # as a flag, and every rank raises after the gather.
        try:
            rows, error = _metric_rows([weights[i] for i in mine], eigs_thresh, fit_kwargs, farms_sampling), None
        except Exception as err:  # noqa: BLE001 - re-raised below, after the collective
            rows, error = torch.full((len(mine), len(METRIC_KEYS)), math.nan, dtype=torch.float64), err
        rows, failed = _gather_rows(rows, mine, owners, process_group, failed=error is not None)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"the spectral pass failed on rank(s) {', '.join(map(str, failed))} of the process "
                               f"group (their own error is in their output); no rank has metrics")
    return {name: dict(zip(METRIC_KEYS, row)) for name, row in zip(names, rows.cpu().tolist())}


def _metric_rows(weights: list[torch.Tensor], eigs_thresh: int, fit_kwargs: dict,
                 farms: FarmsSampling | None = None) -> torch.Tensor:
    """(len(weights), len(METRIC_KEYS)) float64 rows; fits are batched over modules with the same N."""
    gram_dtype = torch.float64 if fit_kwargs["method"] in SMALL_EIGENVALUE_FITS else None
    return metric_rows(eigenvalues(weights, gram_dtype=gram_dtype), eigs_thresh, fit_kwargs,
                       farms_eigenvalues(weights, farms, gram_dtype=gram_dtype) if farms is not None else None)


def metric_rows(all_eigs: list[torch.Tensor], eigs_thresh: int, fit_kwargs: dict,
                farms_spectra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(modules, METRIC_KEYS) float64 rows from each module's eigenvalues (ascending float64, as `eigenvalues`
    gives them; NaN for a non-finite weight, which gives a row of NaN): fits batched over modules with the same
    number of eigenvalues, alpha and D from the FARMS spectra (`farms_eigenvalues`) when given, NaN below
    eigs_thresh eigenvalues. What `module_metrics` computes once it has the eigenvalues; the sharded pass
    (alphadecay/esd/sharded.py) gets them another way and calls this too."""
    rows = torch.empty(len(all_eigs), len(METRIC_KEYS), dtype=torch.float64)
    by_size: dict[int, list[int]] = defaultdict(list)
    farms_fits = _batched_fits(farms_spectra, fit_kwargs) if farms_spectra is not None else None
    for i, e in enumerate(all_eigs):
        by_size[len(e)].append(i)
    for size, idx in by_size.items():
        eigs = torch.stack([all_eigs[i] for i in idx])
        if farms_fits is None:
            alpha, d = fit_power_law(eigs, **fit_kwargs)
        else:
            alpha, d = (f[idx].to(eigs.device) for f in farms_fits)
        if size < eigs_thresh:
            alpha, d = torch.full_like(alpha, math.nan), torch.full_like(d, math.nan)
        stats = spectral_metrics(eigs, alpha)
        stats.update(alpha=alpha, D=d, num_eigs=torch.full_like(alpha, size))
        rows[idx] = torch.stack([stats[k] for k in METRIC_KEYS], dim=1).cpu()
    return rows


def _batched_fits(spectra: list[torch.Tensor], fit_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """α and D (two CPU float64 tensors) of 1-D spectra of any lengths, fitted in batches of equal length."""
    alpha = torch.empty(len(spectra), dtype=torch.float64)
    d = torch.empty_like(alpha)
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(spectra):
        by_length[len(e)].append(i)
    for idx in by_length.values():
        a, dd = fit_power_law(torch.stack([spectra[i] for i in idx]), **fit_kwargs)
        alpha[idx], d[idx] = a.cpu(), dd.cpu()
    return alpha, d


def _rank_and_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _cost(w: torch.Tensor, farms: FarmsSampling | None = None) -> float:
    """Relative time of one matrix: n·m·N for the Gram product plus EIGH_WEIGHT·N³ for eigvalsh, N = min(n, m);
    with FARMS, plus the same for each window."""
    n, m = w.shape
    short = min(n, m)
    cost = float(n * m * short + EIGH_WEIGHT * short**3)
    if farms is not None:
        (long, side), long_offsets, short_offsets = farms_windows(w.shape, farms)
        cost += len(long_offsets) * len(short_offsets) * float(long * side * side + EIGH_WEIGHT * side**3)
    return cost


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """Greedy largest-first (LPT) assignment of modules to ranks: the most expensive module goes first, each to the
    least-loaded rank (lowest rank on ties). Pure and deterministic, so every rank computes the same owners."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where `group`'s collectives take their tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(rows: torch.Tensor, mine: list[int], owners: list[int], group: dist.ProcessGroup | None, *,
                 failed: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Every module's row, in module order, from its owner, and the ranks (of `group`) that flagged `failed`: one
    all_gather of a (modules + 1) × metrics tensor whose last row carries the flag."""
    device = comm_device(group)
    local = torch.zeros(len(owners) + 1, len(METRIC_KEYS), dtype=torch.float64, device=device)
    local[mine] = rows.to(device)
    local[-1, 0] = float(failed)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    flags = torch.stack([g[-1, 0] for g in gathered]).tolist()
    return torch.stack([gathered[owner][i] for i, owner in enumerate(owners)]), [r for r, f in enumerate(flags) if f]


# ---------------------------------------------------------------------------------------------------------------
# reference implementation (the official per-module computation, for benchmarks and tests)
# ---------------------------------------------------------------------------------------------------------------
def reference_module_metrics(named_weights: Sequence[tuple[str, torch.Tensor]], *, need_eigs: bool = True,
                             fit: str = "median", xmin_pos: float = 2.0, filter_zeros: bool = False,
                             official_fix_finger: bool = False, eigs_thresh: int = EIGS_THRESH,
                             estimator: str = "full", farms: FarmsSampling = FarmsSampling()
                             ) -> dict[str, dict[str, float]]:
    """The official pass, one module at a time: fp32 `svdvals`², sorted (WDU.py:218-224), the official Python-loop
    fits (`reference_fit_power_law`) and scalar side metrics. Same output as `module_metrics`; serial, no sharing.
    estimator="farms" fits the authors' per-window loop (`reference_farms_eigenvalues`) instead."""
    out = {}
    for name, w in named_weights:
        w32 = w.detach().to(torch.float32)
        if not need_eigs:
            out[name] = {"fnorm": float(w32.double().square().sum()), "num_eigs": float(min(w.shape))}
            continue
        eigs = torch.sort(torch.linalg.svdvals(w32).square()).values
        fitted = reference_farms_eigenvalues(w32, farms) if estimator == "farms" else eigs
        alpha, d = reference_fit_power_law(fitted, method=fit, xmin_pos=xmin_pos, filter_zeros=filter_zeros,
                                           official_fix_finger=official_fix_finger)
        if len(eigs) < eigs_thresh:
            alpha = d = math.nan
        out[name] = {"alpha": alpha, "D": d, "num_eigs": float(len(eigs)), **_reference_side_metrics(eigs, alpha)}
    return out


def _reference_side_metrics(eigs: torch.Tensor, alpha: float) -> dict[str, float]:
    """WDU.py:225-228, :295-296 and `matrix_entropy` (:312-319), as scalars."""
    eigs = eigs.double()
    top, total = eigs[-1].item(), eigs.sum().item()
    svals = eigs.sqrt()
    rank = int((svals > ENTROPY_EPS).sum())
    p = svals * svals / eigs.sum() + ENTROPY_EPS
    entropy = (-(p * torch.log(p)).sum() / math.log(rank + ENTROPY_EPS)).item()
    x = alpha * (math.log10(top) if top > 0 else -10.0)
    hat = max(x, 0.0) + math.log1p(math.exp(-abs(x))) if math.isfinite(x) else math.nan
    return {"alphahat": hat, "spectral_norm": top, "fnorm": total,
            "stable_rank": total / top if top > 0 else math.nan, "entropy": entropy}


def reference_fit_power_law(eigs: torch.Tensor, *, method: str = "median", xmin_pos: float = 2.0,
                            filter_zeros: bool = False, official_fix_finger: bool = False) -> tuple[float, float]:
    """The official fit of ONE ascending spectrum, loop for loop (WDU.py:237-291), in float64.

    Same conventions as `fit_power_law` (fix-finger bound, positive-only histogram, NaN when invalid), so that it
    is an oracle for the vectorised search.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"unknown power-law fit {method!r}; expected one of {FIT_METHODS}")
    x = eigs.double()
    if filter_zeros and (x > EVALS_THRESH).any():
        x = x[x > EVALS_THRESH]
    n_total = len(x)
    if n_total < 2 or not torch.isfinite(x).all():
        return math.nan, math.nan
    logs = torch.log(x)
    if method == "median":
        i = int(n_total / xmin_pos)
        if i >= n_total:
            return math.nan, math.nan
        return _valid_fit(*_reference_candidate(x, logs, i))
    lower, upper = _reference_window(x, official_fix_finger) if method == "fix-finger" else (-math.inf, math.inf)
    alphas, ds = torch.zeros(n_total - 1, dtype=torch.float64), torch.ones(n_total - 1, dtype=torch.float64)
    for i, xmin in enumerate(x[:-1].tolist()):
        if xmin < lower:
            continue
        if xmin > upper:
            break
        alpha, d = _reference_candidate(x, logs, i)
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = d
    best = int(torch.argmin(ds))
    return _valid_fit(alphas[best].item(), ds[best].item()) if ds[best] < 1 else (math.nan, math.nan)


def _reference_candidate(x: torch.Tensor, logs: torch.Tensor, i: int) -> tuple[float, float]:
    n = len(x) - i
    alpha = 1 + n / (torch.sum(logs[i:]) - n * logs[i])
    seq = torch.arange(n, dtype=torch.float64)
    d = torch.max(torch.abs(1 - (x[i:] / x[i]) ** (-alpha + 1) - seq / n))
    return alpha.item(), d.item()


def _reference_window(x: torch.Tensor, official: bool) -> tuple[float, float]:
    """Fix-finger xmin bounds from torch.histc / torch.linspace as at WDU.py:263-271 (positive values only)."""
    logs = torch.log10(x[x > 0])
    if len(logs) == 0:
        return math.inf, -math.inf
    low, high = logs.min().item(), logs.max().item()
    if low == high:
        low, high = low - 1, high + 1
    counts = torch.histc(logs, BINS, min=low, max=high)
    peak = 10 ** torch.linspace(low, high, BINS + 1, dtype=torch.float64)[torch.argmax(counts)].item()
    return (math.log10(0.95 * peak) if official else 0.95 * peak), 1.5 * peak


def _valid_fit(alpha: float, d: float) -> tuple[float, float]:
    return (alpha, d) if math.isfinite(alpha) and math.isfinite(d) else (math.nan, math.nan)
