"""One torchrun launch for tests/test_fsdp.py (process start-up is most of a gloo test's time on 2 cores):

    torchrun --nproc_per_node=2 tests/fsdp_worker.py PLAN.json

PLAN.json: {"checks": DIR or null, "runs": [[flag, ...], ...]}. With "checks", every rank first runs the
sharded-tensor checks below and writes DIR/checks-<rank>.json ({check: [passed, detail]}); then each run is
`torchrun_main.main(flags)` in turn, in these same processes. They share one process group, made here: a gloo
group destroyed and made again under the same torchrun store can hang in its first collective.
Exit code: the number of runs that failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def checks(out_dir: str) -> None:
    """The sharded pieces against whole tensors, on uneven shards: the Gram route's eigenvalues, the gather, the
    spectral pass, norms (the DTensor .item() trap), clipping."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from alphadecay import esd, parallel
    from alphadecay.esd import sharded
    from alphadecay.wd.groups import module_matrix
    from alphadecay.wd.norms import global_norm, tensor_norms

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, list] = {}

    def check(name: str, passed: bool, detail: object) -> None:
        results[name] = [bool(passed), str(detail)]

    torch.manual_seed(0)
    # out x in: square, tall (Gram route), wide (gather route), odd row counts (uneven shards: 101 = 51 + 50,
    # 7 = 4 + 3), one with a wide spread (the float64 redo), one below the eigenvalue threshold
    shapes = [(64, 64), (176, 64), (64, 176), (101, 60), (7, 70), (300, 80), (60, 61)]
    whole = [torch.randn(*s, dtype=torch.float64).float() * (1 + i) for i, s in enumerate(shapes)]
    whole[5][:, :4] *= 300.0  # λ_max / λ_median ≫ 1e4: float32 Grams are redone in float64
    dts = [distribute_tensor(w, mesh, [Shard(0)]) for w in whole]
    rows = [d.to_local().shape[0] for d in dts]
    check("uneven shards", rows[3] == [51, 50][rank] and rows[4] == [4, 3][rank]
          and rows == [sharded.row_counts(s[0], world)[rank] for s in shapes], rows)

    # the Gram route: Σ_r W_rᵀ W_r on the owner equals WᵀW; its eigenvalues the whole matrix's
    worst = 0.0
    for owner in range(world):
        for w, d in zip(whole, dts):
            gram = sharded.reduce_gram(d, owner, dtype=torch.float64)
            if rank == owner:
                got = torch.linalg.eigvalsh(gram)
                want = torch.linalg.eigvalsh(w.double().T @ w.double())
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            else:
                assert gram is None
    check("gram eigenvalues", worst <= 1e-12, worst)
    same = True
    for w, d in zip(whole, dts):
        gathered = sharded.gather_rows(d, world - 1)
        same &= (gathered is None) if rank != world - 1 else torch.equal(gathered, w)
    check("gather", same, "")

    # the spectral pass: sharded DTensors against one process's spectral.module_metrics of the whole matrices
    farms = esd.FarmsSampling(32, 1.0, 3)
    for fit in ("median", "goodness-of-fit"):
        for estimator in ("full", "farms"):
            kwargs = {"fit": fit, "estimator": estimator, "farms": farms, "eigs_thresh": 50}
            got = sharded.module_metrics([(str(i), d) for i, d in enumerate(dts)], **kwargs)
            # whole (replicated) matrices: each computed whole by one rank, as under DDP
            want = esd.module_metrics([(str(i), w) for i, w in enumerate(whole)], **kwargs)
            rel = {k: max(_rel(got[n][k], want[n][k]) for n in want) for k in esd.METRIC_KEYS}
            check(f"module_metrics {fit} {estimator}", rel["alpha"] <= 1e-5 and max(rel.values()) <= 1e-4, rel)

    # norms: the local shard's norm is not the tensor's (the .item() trap); tensor_norms gives the tensor's
    naive = torch.linalg.vector_norm(dts[3]).to_local().item()
    full = [float(w.double().norm()) for w in whole]
    check("the trap is live", abs(naive - full[3]) > 0.1 * full[3], (naive, full[3]))
    # (float32 norms: each differs from the float64 one by its float32 sum's rounding, ~1e-6 relative)
    norms = tensor_norms(dts).tolist()
    check("tensor_norms", all(abs(a - b) <= 1e-5 * b for a, b in zip(norms, full)), (norms, full))
    check("tensor_norms mixed", tensor_norms([whole[0], dts[1]]).tolist() == [norms[0], norms[1]]
          and tensor_norms(whole).tolist() == [n.double().item() for n in torch._foreach_norm(whole)], "")
    total = math.sqrt(sum(f * f for f in full))
    check("global_norm", abs(float(global_norm(dts)) - total) <= 1e-5 * total, (float(global_norm(dts)), total))

    # clipping sharded gradients: the same total norm and clipped values as on whole tensors
    plain = [torch.nn.Parameter(w.clone()) for w in whole]
    sharded_params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in whole]
    for p, q in zip(plain, sharded_params):
        p.grad = p.detach() * 0.01
        q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
    n_plain = torch.nn.utils.clip_grad_norm_(plain, 1.0)
    n_sharded = parallel.clip_grad_norm(sharded_params, 1.0)
    diff = max(float((p.grad - q.grad.full_tensor()).abs().max()) for p, q in zip(plain, sharded_params))
    check("clip_grad_norm", not parallel.is_dtensor(n_sharded) and abs(float(n_plain - n_sharded)) <= 1e-5 * float(
        n_plain) and diff <= 1e-6, (float(n_plain), float(n_sharded), diff))

    # FSDP's Linear weights are row-sharded DTensors, so the weight-decay rules take the sharded route
    linear = torch.nn.Linear(60, 101, bias=False)
    fully_shard(linear, mesh=mesh)
    check("fsdp weights are row-sharded", sharded.is_row_sharded(module_matrix(linear)), type(linear.weight))

    with open(os.path.join(out_dir, f"checks-{rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    dist.barrier()


def _rel(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b) / max(abs(b), 1e-300)


def main() -> int:
    with open(sys.argv[1]) as fh:
        plan = json.load(fh)
    import torchrun_main
    from alphadecay import dist as alphadecay_dist

    dist.init_process_group("gloo")
    alphadecay_dist.teardown = lambda: None  # the runs keep this process group (dist.setup reuses it)
    if plan.get("checks"):
        checks(plan["checks"])
    failed = 0
    for flags in plan.get("runs", []):
        try:
            failed += torchrun_main.main(flags) != 0
        except Exception:  # noqa: BLE001 - report and go on: the test names the run that failed
            traceback.print_exc()
            failed += 1
    dist.destroy_process_group()
    return failed


if __name__ == "__main__":
    sys.exit(main())
