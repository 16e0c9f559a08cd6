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
of a (modules × metrics) float64 table gives every rank every module's metrics.

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
from collections.abc import Sequence

import torch
import torch.distributed as dist

from alphadecay.esd import spectral
from alphadecay.esd.spectral import (EIGH_WEIGHT, EIGS_THRESH, FP32_MAX_SPREAD, METRIC_KEYS, SMALL_EIGENVALUE_FITS,
                                     FarmsSampling, assign_owners, eigenvalues, farms_eigenvalues, farms_windows,
                                     fit_power_law, spectral_metrics)

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
    redo = torch.zeros(len(weights), dtype=torch.float64, device=_comm_device(group))

    def compute(i: int, received: torch.Tensor | None, dtype: torch.dtype | None) -> None:
        if routes[i] == GRAM:
            eigs = torch.linalg.eigvalsh(received).clamp_(min=0).to(torch.float64)
            spread = eigs[-1] / eigs[eigs.shape[0] // 2]
            if dtype is None and not bool(spread <= FP32_MAX_SPREAD):  # also NaN and inf: as spectral.eigenvalues
                redo[i] = 1.0
            spectra[i] = eigs
        else:
            whole = received if received is not None else weights[i]
            spectra[i] = eigenvalues([whole], gram_dtype=dtype)[0]
            if farms_sampling is not None:
                farms_spectra[i] = farms_eigenvalues([whole], farms_sampling, gram_dtype=dtype)[0]

    _rounds(list(range(len(weights))), weights, routes, owners, rank, group, gram_dtype, compute)
    if gram_dtype is None and any(how == GRAM for how in routes):
        dist.all_reduce(redo, group=group)
        again = [i for i in range(len(weights)) if redo[i] > 0]
        if again:
            _rounds(again, weights, routes, owners, rank, group, torch.float64, compute)
    mine = sorted(spectra)
    rows = torch.zeros(len(weights), len(METRIC_KEYS), dtype=torch.float64, device=_comm_device(group))
    if mine:
        rows[mine] = metric_rows([spectra[i] for i in mine], eigs_thresh, fit_kwargs,
                                 [farms_spectra[i] for i in mine] if farms_sampling is not None else None
                                 ).to(rows.device)
    dist.all_reduce(rows, group=group)  # each row is non-zero on its owner only: exact
    return {name: dict(zip(METRIC_KEYS, row)) for name, row in zip(names, rows.cpu().tolist())}


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rounds(modules: list[int], weights: list[torch.Tensor], routes: list[str], owners: list[int], rank: int,
            group: dist.ProcessGroup, gram_dtype: torch.dtype | None, compute) -> None:
    """Every module of `modules`, a round at a time: each rank owns at most one module per round; the round's
    collectives in module order, then each owner's computation (`compute(i, received, gram_dtype)`)."""
    queues: dict[int, list[int]] = defaultdict(list)
    for i in modules:
        queues[owners[i]].append(i)
    for j in range(max((len(q) for q in queues.values()), default=0)):
        this_round = sorted(q[j] for q in queues.values() if j < len(q))
        received: dict[int, torch.Tensor | None] = {}
        for i in this_round:
            owner = dist.get_global_rank(group, owners[i])
            if routes[i] == GRAM:
                gram = reduce_gram(weights[i], owner, group, gram_dtype or torch.float32)
                if owners[i] == rank:
                    received[i] = gram
            elif routes[i] == GATHER:
                whole = gather_rows(weights[i], owner, group)
                if owners[i] == rank:
                    received[i] = whole
            elif owners[i] == rank:
                received[i] = None
        for i, value in received.items():
            compute(i, value, gram_dtype)


def reduce_gram(w: torch.Tensor, owner: int, group: dist.ProcessGroup | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """WᵀW of the row-sharded DTensor `w` on the rank `owner` (a global rank; None elsewhere): each rank's shard
    Gram W_rᵀ W_r in `dtype`, summed by one `dist.reduce`. A collective of `group` (default: the world)."""
    local = w.to_local().to(dtype)
    gram = local.mT @ local
    del local
    dist.reduce(gram, dst=owner, group=group)
    return gram if dist.get_rank() == owner else None


def gather_rows(w: torch.Tensor, owner: int, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
    """The whole row-sharded DTensor `w` on the rank `owner` (a global rank; None elsewhere): the shards padded
    to ⌈out/N⌉ rows, one `dist.gather`. A collective of `group` (default: the world)."""
    is_owner = dist.get_rank() == owner
    world = dist.get_world_size(group)
    counts = row_counts(w.shape[0], world)
    local = w.to_local()
    mine = counts[dist.get_rank(group)]
    if local.shape[0] != mine:
        raise RuntimeError(f"sharded ESD pass: a shard has {local.shape[0]} rows, expected {mine} of {w.shape[0]} "
                           f"(rows split as torch.chunk splits them)")
    padded = local.new_zeros(max(counts), w.shape[1])
    padded[:mine] = local
    pieces = [torch.empty_like(padded) for _ in range(world)] if is_owner else None
    dist.gather(padded, pieces, dst=owner, group=group)
    if not is_owner:
        return None
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def metric_rows(spectra: list[torch.Tensor], eigs_thresh: int, fit_kwargs: dict,
                farms_spectra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """(modules, METRIC_KEYS) float64 rows from each module's eigenvalues (ascending float64) as
    `spectral.module_metrics` computes them: fits batched over modules with the same number of eigenvalues,
    alpha and D from the FARMS spectra when given, NaN below eigs_thresh eigenvalues."""
    rows = torch.empty(len(spectra), len(METRIC_KEYS), dtype=torch.float64)
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(spectra):
        by_size[len(e)].append(i)
    farms_fits = None
    if farms_spectra is not None:
        farms_fits = torch.empty(len(spectra), 2, dtype=torch.float64)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, e in enumerate(farms_spectra):
            by_length[len(e)].append(i)
        for idx in by_length.values():
            a, d = fit_power_law(torch.stack([farms_spectra[i] for i in idx]), **fit_kwargs)
            farms_fits[idx] = torch.stack([a, d], dim=1).cpu()
    for size, idx in by_size.items():
        eigs = torch.stack([spectra[i] for i in idx])
        if farms_fits is None:
            alpha, d = fit_power_law(eigs, **fit_kwargs)
        else:
            alpha, d = (farms_fits[idx, k].to(eigs.device) for k in range(2))
        if size < eigs_thresh:
            alpha, d = torch.full_like(alpha, math.nan), torch.full_like(d, math.nan)
        stats = spectral_metrics(eigs, alpha)
        stats.update(alpha=alpha, D=d, num_eigs=torch.full_like(alpha, size))
        rows[idx] = torch.stack([stats[k] for k in METRIC_KEYS], dim=1).cpu()
    return rows
