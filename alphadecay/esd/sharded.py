"""The spectral pass when no rank holds a whole matrix: weights that are DTensors sharded by rows (FSDP2).

`module_metrics` is `spectral.module_metrics` for plain tensors (one process, DDP replicas) and this module's
sharded route when the weights are DTensors; the weight-decay rules call it and get the same dict either way.

The route, per weight W (out × in) with rank r holding the rows W_r (an uneven last shard included):
* Gram route, when in ≤ out (WᵀW is the small side; q/k/v/o, gate, up, lm_head): WᵀW = Σ_r W_rᵀ W_r. Every rank
  computes its shard's in × in Gram matrix and `dist.reduce` sums them on the module's owner, which takes the
  eigenvalues. The Gram product is split over the ranks; the owner receives in² numbers.
* Gather route, when in > out (down_proj: in = ffn, where WᵀW would be ffn × ffn, ~7× the bytes and ~20× the
  eigvalsh of W Wᵀ), and for every weight under FARMS (whose windows cut across rows): the shards are gathered on
  the owner alone (`dist.gather`), which then runs `spectral.eigenvalues` (W Wᵀ, the smaller side) and
  `spectral.farms_eigenvalues` on the whole matrix exactly as one process would.
* A weight that is not row-sharded (a plain tensor, or a DTensor otherwise placed, made whole first) is taken by
  its owner directly.
Owners are fixed per module by cost (`spectral.assign_owners`, largest first). The pass runs in rounds: in each
round every rank owns at most one module, the round's collectives run in module order (the same order on every
rank), then each owner computes its module's eigenvalues and fit while the others compute theirs. One all-reduce
of a (modules × metrics) float64 table gives every rank every module's metrics; the fits are
`spectral.metric_rows`, the same code as one process's pass.

Failures are handled as in `spectral.module_metrics`: a weight with a NaN or an infinity gets a row of NaN (its Gram
matrix is zeroed before eigvalsh, which would raise on it, and its eigenvalues set to NaN; the gather route gets
this from `spectral.eigenvalues`); an error on one rank's share of the pass (memory running out) is recorded, the
rank still takes part in every later collective (sending zeros where its part failed), the final all-reduce carries
each rank's failure flag, and every rank raises: its own error, or one naming the ranks that failed. No rank is
left waiting in a collective.

Precision is `spectral.eigenvalues`' rule: float32 Gram matrices, redone in float64 where λ_max / λ_median exceeds
FP32_MAX_SPREAD (one all-reduce of the redo flags, then a second round of float64 Grams for those), and float64
from the start for the fits that need the smallest eigenvalues (fix-finger, goodness-of-fit). The sums of shard
Grams differ from one product only by rounding: alphas equal one process's to about 1e-7 relative (tested against
the whole matrices, uneven shards included).

Extra peak memory per rank, beyond the training state, for one pass (no rank ever holds more than one round's
module): Gram route, on every rank its shard's float32 copy (4·⌈out/N⌉·in bytes) and the in × in Gram (4·in²;
8·in² when redone in float64), which the reduce sums in place on the owner, plus eigvalsh's copy of it there;
gather route, on the owner only, the gathered shards and their concatenation (2 × 2·out·in in bf16, briefly), the
float32 copy `spectral.eigenvalues` makes (4·out·in), the out × out Gram and eigvalsh's copy (2 × 4·out²).
LLaMA-7B (hidden 4096, ffn 11008, bf16, 2 ranks): Gram route (gate_proj) 86 + 64 MiB while multiplying (the
shard's copy is freed before the reduce), 2 × 64 MiB on the owner during eigvalsh: 0.15 GiB; gather route
(down_proj) on its owner 86 MiB of gathered W, its 172 MiB float32 copy and the 64 MiB Gram while multiplying:
0.31 GiB. At most about 0.3 GiB on any rank, against 6.7 GiB of training state per rank at 8 ranks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from alphadecay.esd import spectral
from alphadecay.esd.spectral import (EIGH_WEIGHT, EIGS_THRESH, FP32_MAX_SPREAD, METRIC_KEYS, SMALL_EIGENVALUE_FITS,
                                     FarmsSampling, assign_owners, comm_device, eigenvalues, farms_eigenvalues,
                                     farms_windows, gram_eigenvalues, metric_rows)

GRAM, GATHER, LOCAL = "gram", "gather", "local"


def is_row_sharded(w: torch.Tensor) -> bool:
    """A DTensor on a 1-D mesh, sharded by rows: FSDP2's layout of a 2-D weight."""
    from torch.distributed.tensor import DTensor, Shard

    return (isinstance(w, DTensor) and w.dim() == 2 and w.device_mesh.ndim == 1
            and w.placements[0] == Shard(0))


def module_metrics(named_weights: Sequence[tuple[str, torch.Tensor]], **kwargs) -> dict[str, dict[str, float]]:
    """`spectral.module_metrics`, also for DTensor weights (the sharded route above); same arguments, same dict
    on every rank. With DTensors, every rank must call it with the same names and shapes (a collective)."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(w, DTensor) for _, w in named_weights):
        return spectral.module_metrics(named_weights, **kwargs)
    return sharded_module_metrics(named_weights, **kwargs)


def row_counts(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard when `rows` are split as torch.chunk splits them (FSDP2's and DTensor Shard(0)'s
    layout): ⌈rows/N⌉ each, the last non-empty shard shorter, any further ones empty."""
    chunk = math.ceil(rows / world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def route(w: torch.Tensor, estimator: str) -> str:
    if not is_row_sharded(w):
        return LOCAL
    out, inp = w.shape
    return GRAM if inp <= out and estimator == "full" else GATHER


def cost(w: torch.Tensor, how: str, world: int, farms: FarmsSampling | None) -> float:
    """The owner's relative time for one module (spectral's cost model: n·m·N for the Gram, EIGH_WEIGHT·N³ for
    eigvalsh); the Gram route's product is shared by all ranks."""
    n, m = w.shape
    short = min(n, m)
    gram = float(n * m * short) / (world if how == GRAM else 1)
    total = gram + EIGH_WEIGHT * short**3
    if farms is not None:
        (long, side), long_offsets, short_offsets = farms_windows(w.shape, farms)
        total += len(long_offsets) * len(short_offsets) * float(long * side * side + EIGH_WEIGHT * side**3)
    return total


def sharded_module_metrics(named_weights: Sequence[tuple[str, torch.Tensor]], *, need_eigs: bool = True,
                           fit: str = "median", xmin_pos: float = 2.0, filter_zeros: bool = False,
                           official_fix_finger: bool = False, eigs_thresh: int = EIGS_THRESH,
                           process_group: dist.ProcessGroup | None = None, estimator: str = "full",
                           farms: FarmsSampling = FarmsSampling()) -> dict[str, dict[str, float]]:
    """The metrics of `spectral.module_metrics` for weights of which some are row-sharded DTensors (module
    docstring). The ranks are those of the DTensors' mesh; `process_group` is accepted for the same signature
    and must be None or that mesh's group."""
    from torch.distributed.tensor import DTensor

    if estimator not in spectral.ESD_ESTIMATORS:
        raise ValueError(f"unknown ESD estimator {estimator!r}; expected one of {spectral.ESD_ESTIMATORS}")
    names = [name for name, _ in named_weights]
    weights = [w.detach() for _, w in named_weights]
    meshes = {w.device_mesh for w in weights if is_row_sharded(w)}
    if len(meshes) > 1:
        raise ValueError("sharded ESD pass: the weights are sharded over different device meshes")
    # anything not sharded by rows on a 1-D mesh is made whole (on every rank) and treated as a plain tensor
    weights = [w.full_tensor() if isinstance(w, DTensor) and not is_row_sharded(w) else w for w in weights]
    if not need_eigs:
        from alphadecay.wd.norms import tensor_norms

        fnorms = tensor_norms(weights).square().cpu().tolist()
        return {n: {"fnorm": f, "num_eigs": float(min(w.shape))} for n, w, f in zip(names, weights, fnorms)}
    if not meshes:
        return spectral.module_metrics(list(zip(names, weights)), need_eigs=True, fit=fit, xmin_pos=xmin_pos,
                                       filter_zeros=filter_zeros, official_fix_finger=official_fix_finger,
                                       eigs_thresh=eigs_thresh, process_group=process_group, estimator=estimator,
                                       farms=farms)
    mesh = next(iter(meshes))
    group = mesh.get_group()
    if process_group is not None and process_group != group:
        raise ValueError("sharded ESD pass: process_group must be the weights' mesh group (or None)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    fit_kwargs = {"method": fit, "xmin_pos": xmin_pos, "filter_zeros": filter_zeros,
                  "official_fix_finger": official_fix_finger}
    farms_sampling = farms if estimator == "farms" else None
    routes = [route(w, estimator) for w in weights]
    owners = assign_owners([cost(w, how, world, farms_sampling) for w, how in zip(weights, routes)], world)
    gram_dtype = torch.float64 if fit in SMALL_EIGENVALUE_FITS else None

    spectra: dict[int, torch.Tensor] = {}  # module -> eigenvalues, on its owner
    farms_spectra: dict[int, torch.Tensor] = {}
    redo = torch.zeros(len(weights), dtype=torch.float64, device=comm_device(group))

    def compute(i: int, received: torch.Tensor | None, dtype: torch.dtype | None) -> None:
        if routes[i] == GRAM:
            eigs = gram_eigenvalues(received)  # NaN for a non-finite weight (or a Gram that overflowed)
            spread = eigs[-1] / eigs[eigs.shape[0] // 2]
            if dtype is None and not bool(spread <= FP32_MAX_SPREAD):  # also NaN and inf: as spectral.eigenvalues
                redo[i] = 1.0
            spectra[i] = eigs
        else:
            whole = received if received is not None else weights[i]
            spectra[i] = eigenvalues([whole], gram_dtype=dtype)[0]
            if farms_sampling is not None:
                farms_spectra[i] = farms_eigenvalues([whole], farms_sampling, gram_dtype=dtype)[0]

    errors: list[BaseException] = []  # this rank's failures: it goes on with the collectives, then raises
    _rounds(list(range(len(weights))), weights, routes, owners, rank, group, gram_dtype, compute, errors)
    if gram_dtype is None and any(how == GRAM for how in routes):
        dist.all_reduce(redo, group=group)
        again = [i for i in range(len(weights)) if redo[i] > 0]
        if again:
            _rounds(again, weights, routes, owners, rank, group, torch.float64, compute, errors)
    mine = sorted(spectra)
    n, k = len(weights), len(METRIC_KEYS)
    # the metrics table, then one failure flag per rank: one all-reduce
    table = torch.zeros(n * k + world, dtype=torch.float64, device=comm_device(group))
    rows = table[:n * k].view(n, k)
    if mine and not errors:
        _guard(errors, lambda: rows.index_copy_(0, torch.tensor(mine, device=rows.device), metric_rows(
            [spectra[i] for i in mine], eigs_thresh, fit_kwargs,
            [farms_spectra[i] for i in mine] if farms_sampling is not None else None).to(rows.device)))
    table[n * k + rank] = float(bool(errors))
    dist.all_reduce(table, group=group)  # each row is non-zero on its owner only: exact
    if errors:
        raise errors[0]
    failed = [r for r in range(world) if table[n * k + r] > 0]
    if failed:
        raise RuntimeError(f"the sharded spectral pass failed on rank(s) {', '.join(map(str, failed))} of the process "
                           f"group (their own error is in their output); no rank has metrics")
    return {name: dict(zip(METRIC_KEYS, row)) for name, row in zip(names, rows.cpu().tolist())}


def _guard(errors: list[BaseException] | None, fn: Callable, fallback: Callable | None = None):
    """fn(), or, when it raises and `errors` is a list, the error appended to it and fallback() returned (None
    without one): how a rank that failed keeps taking part in the pass's collectives. errors=None: fn() as is."""
    if errors is None:
        return fn()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - raised by sharded_module_metrics after the last collective
        errors.append(err)
        return fallback() if fallback is not None else None


def _rounds(modules: list[int], weights: list[torch.Tensor], routes: list[str], owners: list[int], rank: int,
            group: dist.ProcessGroup, gram_dtype: torch.dtype | None, compute, errors: list[BaseException]) -> None:
    """Every module of `modules`, a round at a time: each rank owns at most one module per round; the round's
    collectives in module order, then each owner's computation (`compute(i, received, gram_dtype)`). A failure
    goes to `errors` (the module is left without a spectrum) and the rounds go on."""
    queues: dict[int, list[int]] = defaultdict(list)
    for i in modules:
        queues[owners[i]].append(i)
    for j in range(max((len(q) for q in queues.values()), default=0)):
        this_round = sorted(q[j] for q in queues.values() if j < len(q))
        received: dict[int, torch.Tensor | None] = {}
        for i in this_round:
            owner = dist.get_global_rank(group, owners[i])
            if routes[i] == GRAM:
                gram = reduce_gram(weights[i], owner, group, gram_dtype or torch.float32, errors=errors)
                if owners[i] == rank:
                    received[i] = gram
            elif routes[i] == GATHER:
                whole = gather_rows(weights[i], owner, group, errors=errors)
                if owners[i] == rank:
                    received[i] = whole
            elif owners[i] == rank:
                received[i] = None
        for i, value in received.items():
            if routes[i] != LOCAL and value is None:  # this rank's own part failed: no spectrum for module i
                continue
            _guard(errors, lambda: compute(i, value, gram_dtype))


def reduce_gram(w: torch.Tensor, owner: int, group: dist.ProcessGroup | None = None,
                dtype: torch.dtype = torch.float32, errors: list[BaseException] | None = None) -> torch.Tensor | None:
    """WᵀW of the row-sharded DTensor `w` on the rank `owner` (a global rank; None elsewhere): each rank's shard
    Gram W_rᵀ W_r in `dtype`, summed by one `dist.reduce`. A collective of `group` (default: the world). With
    `errors`, a failure of this rank's product is appended there and zeros are sent instead (`_guard`)."""
    def local_gram() -> torch.Tensor:
        local = w.to_local().to(dtype)
        return local.mT @ local

    inner = w.shape[1]
    gram = _guard(errors, local_gram, lambda: torch.zeros(inner, inner, dtype=dtype, device=w.to_local().device))
    dist.reduce(gram, dst=owner, group=group)
    return gram if dist.get_rank() == owner else None


def gather_rows(w: torch.Tensor, owner: int, group: dist.ProcessGroup | None = None,
                errors: list[BaseException] | None = None) -> torch.Tensor | None:
    """The whole row-sharded DTensor `w` on the rank `owner` (a global rank; None elsewhere): the shards padded
    to ⌈out/N⌉ rows, one `dist.gather`. A collective of `group` (default: the world). With `errors`, a failure
    on this rank is appended there (zeros are sent instead, and the owner gets None: `_guard`)."""
    is_owner = dist.get_rank() == owner
    world = dist.get_world_size(group)
    counts = row_counts(w.shape[0], world)
    local = w.to_local()
    mine = counts[dist.get_rank(group)]

    def pad() -> torch.Tensor:
        if local.shape[0] != mine:
            raise RuntimeError(f"sharded ESD pass: a shard has {local.shape[0]} rows, expected {mine} of "
                               f"{w.shape[0]} (rows split as torch.chunk splits them)")
        padded = local.new_zeros(max(counts), w.shape[1])
        padded[:mine] = local
        return padded

    padded = _guard(errors, pad, lambda: local.new_zeros(max(counts), w.shape[1]))
    pieces = None
    if is_owner:  # an owner that cannot hold the pieces still takes part: it receives them all into one buffer
        pieces = _guard(errors, lambda: [torch.empty_like(padded) for _ in range(world)], lambda: [padded] * world)
    dist.gather(padded, pieces, dst=owner, group=group)
    if not is_owner:
        return None
    if errors and any(p is padded for p in pieces):
        return None
    return _guard(errors, lambda: torch.cat([piece[:count] for piece, count in zip(pieces, counts)]))
