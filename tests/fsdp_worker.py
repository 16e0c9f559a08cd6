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
    spectral pass (with FARMS' min_step, NaN weights, an error on one rank), norms (the DTensor .item() trap),
    clipping."""
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

    # FARMS' --farms_min_step reaches the sharded route: with min_step 0.5 it equals the whole matrices' with 0.5,
    # which differ from those with the authors' positions (min_step 0)
    spaced, dense = esd.FarmsSampling(32, 1.0, 15, min_step=0.5), esd.FarmsSampling(32, 1.0, 15, min_step=0.0)
    got = sharded.module_metrics([(str(i), d) for i, d in enumerate(dts)], estimator="farms", farms=spaced)
    want = esd.module_metrics([(str(i), w) for i, w in enumerate(whole)], estimator="farms", farms=spaced)
    authors = esd.module_metrics([(str(i), w) for i, w in enumerate(whole)], estimator="farms", farms=dense)
    check("farms min_step", max(_rel(got[n]["alpha"], want[n]["alpha"]) for n in want) <= 1e-5
          and got["1"]["alpha"] != authors["1"]["alpha"],
          (got["1"]["alpha"], want["1"]["alpha"], authors["1"]["alpha"]))

    # a NaN weight gives a row of NaN, on either route and with either estimator, and the other rows are as before:
    # a NaN in rank 0's shard of a Gram-route weight (176 x 64), in rank 1's of a gather-route one (64 x 176)
    poisoned = [w.clone() for w in whole]
    poisoned[1][0, 0] = math.nan
    poisoned[2][-1, 5] = math.inf
    nan_dts = [distribute_tensor(w, mesh, [Shard(0)]) for w in poisoned]
    for estimator in ("full", "farms"):
        got = sharded.module_metrics([(str(i), d) for i, d in enumerate(nan_dts)], estimator=estimator, farms=farms)
        want = esd.module_metrics([(str(i), w) for i, w in enumerate(whole)], estimator=estimator, farms=farms)
        nan_rows = all(math.isnan(got[n][k]) for n in ("1", "2") for k in esd.METRIC_KEYS if k != "num_eigs")
        others = max(_rel(got[n]["alpha"], want[n]["alpha"]) for n in want if n not in ("1", "2"))
        check(f"nan weight {estimator}", nan_rows and others <= 1e-5, (got["1"], got["2"], others))

    # an error on one rank's share (rank 1's eigvalsh) reaches every rank, without a hang: rank 1 raises its own,
    # rank 0 one that names rank 1; the next pass works again
    real_eigvalsh = torch.linalg.eigvalsh

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    if rank == 1:
        torch.linalg.eigvalsh = broken
    try:
        sharded.module_metrics([(str(i), d) for i, d in enumerate(dts)])
        raised = "nothing"
    except RuntimeError as err:
        raised = str(err)
    finally:
        torch.linalg.eigvalsh = real_eigvalsh
    expected = "out of memory (simulated)" if rank == 1 else "the sharded spectral pass failed on rank(s) 1 of"
    again = sharded.module_metrics([(str(i), d) for i, d in enumerate(dts)])
    check("an error reaches every rank", raised.startswith(expected) and set(again) == set(map(str, range(7))),
          raised)

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

    checkpoint_checks(out_dir, check)

    with open(os.path.join(out_dir, f"checks-{rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    dist.barrier()


def checkpoint_checks(out_dir: str, check) -> None:
    """Sharded checkpoints with two writers: a real I/O error on rank 1 only (RLIMIT_FSIZE: its DCP shard cannot
    be written) stops both ranks with the one-paragraph RunFault and leaves nothing behind; the next save is whole
    and its manifest covers both ranks' shards."""
    import resource
    import signal

    from alphadecay import checkpoint, parallel, sharded_checkpoint
    from alphadecay.errors import RunFault
    from alphadecay.model import build_model, load_model_config

    rank = dist.get_rank()
    run_dir = os.path.join(out_dir, "save")
    if rank == 0:
        os.makedirs(run_dir)
    dist.barrier()
    model = build_model(load_model_config(os.path.join(REPO, "configs", "llama_1m.json")), seed=0)
    parallel.fully_shard_llama(model, torch.device("cpu"), chunk_tokens=0, reduce_dtype=torch.float32, compile=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"step": 1, "world_size": 2}
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        sharded_checkpoint.save(run_dir, 1, model, optimizer, state, full_model=False)
        message = "no error"
    except RunFault as err:
        message = str(err)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    dist.barrier()
    check("a failed shard write stops every rank",
          message.startswith(f"the checkpoint {run_dir}/model_1 could not be written (File too large [errno 27])")
          and "The partial write was removed" in message and os.listdir(run_dir) == [], (message, os.listdir(run_dir)))
    path = sharded_checkpoint.save(run_dir, 1, model, optimizer, state, full_model=False)
    dist.barrier()
    with open(os.path.join(path, checkpoint.MANIFEST)) as fh:
        listed = json.load(fh)["files"]
    expected = {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "config.json", checkpoint.STATE_FILE}
    check("the manifest covers every writer's shards",
          expected <= set(listed) and checkpoint.verify_checkpoint(path) == checkpoint.Verdict(True, True)
          and os.listdir(run_dir) == ["model_1"], (sorted(listed), os.listdir(run_dir)))


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
