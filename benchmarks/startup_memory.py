"""Memory of starting a run: building the model and resuming it (host), and DDP's gradients (device), before vs now.

    python benchmarks/startup_memory.py                               # llama_1b; CUDA if present, else `meta`
    python benchmarks/startup_memory.py --parts build --config 350m
    python benchmarks/startup_memory.py --device cpu --parts resume,ddp --config 60m

Each variant runs in a fresh process (glibc serves every block above 64 KiB with its own mmap, so a freed tensor
leaves the resident set at once; see benchmarks/loss_memory.py), and each part prints now ÷ before.

build: the host's peak while a rank builds the model and puts it on its device in bf16. Before: `build_model` on
the host in float32, then `cast_model` (what build_trainer did). Now: `build_model(device=...)` (each parameter
on the device from its registration, every init operation on a host copy of one tensor), then `cast_model`.
Measured: VmHWM - VmRSS just before the build. Without a GPU the device is `meta`: the host then does exactly the
work it does for a GPU (the same random draws and init operations, one tensor at a time) and nothing is held on a
device. Checked: the two builds give the same parameters and buffers (SHA-256 over their bytes; on meta, where
there are no values, over the CPU generator's state after the build, i.e. the same random stream).

resume: the host's memory while a rank loads a checkpoint of the model (bf16 weights and AdamW state, written by
save_checkpoint) into a model and optimizer already on the device. Before: safetensors to the host and torch.load
into memory. Now: `load_checkpoint(path, device)` (weights to the device, training_state.pt memory-mapped).
Measured: the peak of RssAnon above its start (sampled every 2 ms): what the rank holds alone; and VmHWM, which also
counts the file pages a map touches: those are the page cache, one copy for all the ranks of a node, which the
kernel may drop. Needs a device with memory (cpu or cuda).

ddp: the device's peak over two updates (after two warm-up updates, so DDP's gradient views exist) of DDP in a
one-process group (NCCL with device_id on CUDA, gloo on CPU): `Trainer.train_step` with AdamW and
zero_grad(set_to_none=True), with 1 and then 2 micro-batches per update (no_sync on all but the last), in one
process per variant. Before: gradient_as_bucket_view=False. Now: `dist.ddp` (gradient_as_bucket_view=True).
Measured on CUDA: torch.cuda.max_memory_allocated; on CPU: the sampled RssAnon peak above its start.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("build", "resume", "ddp")


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class AnonPeak:
    """The largest RssAnon seen by a thread sampling /proc/self/status every `interval` seconds."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.start_kib, self.peak_kib = interval, status_kib("RssAnon"), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
            if self._stop.wait(self.interval):
                return

    def stop(self) -> float:
        """MiB above the start."""
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
        return (self.peak_kib - self.start_kib) / 1024


# -- children: one variant each, in a fresh process; each prints one JSON line ------------------------------------
def fast_model(config, device):
    """The model on the device, initialised there (values do not matter for these measurements), in bf16 on CUDA."""
    import torch
    from transformers import LlamaForCausalLM

    from alphadecay.model import cast_model

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return cast_model(model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def adamw(model, device):
    from alphadecay.config import parse_args
    from alphadecay.optim import build_optimizer
    from alphadecay.wd.groups import module_param_groups

    config, _ = parse_args(["--optimizer", "adamw", "--weight_decay", "0.1"])
    return build_optimizer(module_param_groups(model, 0.1), config, device), config


def digest(model) -> str:
    import torch

    h = hashlib.sha256()
    for name, t in sorted([*model.named_parameters(), *model.named_buffers()]):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from alphadecay import dist
    from alphadecay.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint
    from alphadecay.model import build_model, cast_model, load_model_config

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = load_model_config(str(REPO / "configs" / f"llama_{args.config}.json"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.child == "build":
        Path("/proc/self/clear_refs").write_text("5")
        before = status_kib("VmRSS")
        start = time.perf_counter()
        model = build_model(config, seed=0, device="cpu" if args.variant == "before" else device)
        cast_model(model, device, torch.bfloat16)
        sync()
        seconds, peak = time.perf_counter() - start, status_kib("VmHWM")
        if device.type == "meta":  # no values: the random stream the build consumed
            check = hashlib.sha256(torch.get_rng_state().numpy()).hexdigest()[:16]
        else:
            check = digest(model)
        return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "digest": check}
    if args.child == "write":
        model = fast_model(config, device)
        optimizer, _ = adamw(model, device)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # AdamW's state: step, exp_avg, exp_avg_sq
        path = save_checkpoint(args.dir, 1, model, {"step": 1, "optimizer": optimizer.state_dict()})
        return {"path": path, "gib": sum(f.stat().st_size for f in Path(path).iterdir()) / 2**30}
    if args.child == "resume":
        from safetensors.torch import load_file

        model = fast_model(config, device)
        optimizer, _ = adamw(model, device)
        Path("/proc/self/clear_refs").write_text("5")
        before = status_kib("VmRSS")
        anon = AnonPeak()
        start = time.perf_counter()
        if args.variant == "before":
            weights = load_file(os.path.join(args.dir, "model.safetensors"))
            state = torch.load(os.path.join(args.dir, STATE_FILE), map_location="cpu", weights_only=False)
        else:
            weights, state = load_checkpoint(args.dir, device)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        del weights, state
        gc.collect()
        sync()
        seconds = time.perf_counter() - start
        return {"anon_mib": anon.stop(), "hwm_mib": (status_kib("VmHWM") - before) / 1024, "seconds": seconds}
    if args.child == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        from alphadecay.loss import CausalLMLoss
        from alphadecay.trainer import Trainer

        @dataclasses.dataclass(frozen=True)
        class OneProcessGroup(dist.DistInfo):
            @property
            def distributed(self) -> bool:  # a group of one: the trainer uses no_sync as on several ranks
                return True

        torch.distributed.init_process_group(**dist.process_group_options(device), rank=0, world_size=1)
        info = OneProcessGroup(rank=0, local_rank=device.index or 0, world_size=1, device=device)
        raw = fast_model(config, device)
        optimizer, train_config = adamw(raw, device)
        if args.variant == "before":
            model = DistributedDataParallel(CausalLMLoss(raw), device_ids=[info.local_rank] if device.type == "cuda"
                                            else None, forward_sync_buffers=False, gradient_as_bucket_view=False)
        else:
            model = dist.ddp(CausalLMLoss(raw), info)
        trainer = Trainer.for_updates(train_config, info, model, optimizer, raw_model=raw)
        gen = torch.Generator().manual_seed(0)
        peaks = {}
        for accumulation in (int(a) for a in args.accumulations.split(",")):
            micro = [{"input_ids": ids, "labels": ids} for ids in
                     torch.randint(3, config.vocab_size, (accumulation, args.rows, args.length), generator=gen)]
            for _ in range(2):
                trainer.train_step(micro)
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            anon = AnonPeak()
            for _ in range(2):
                trainer.train_step(micro)
            sync()
            anon_mib = anon.stop()
            peaks[accumulation] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                   else anon_mib)
        torch.distributed.destroy_process_group()
        return {"peak_mib": peaks}
    raise ValueError(args.child)


def run_child(kind: str, variant: str, args: argparse.Namespace, **extra) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--variant", variant, "--config", args.config,
               "--device", args.device, "--threads", str(args.threads), "--rows", str(args.rows),
               "--length", str(args.length), "--accumulations", args.accumulations]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} ({variant}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- parts: each returns its table rows and whether its check passed ----------------------------------------------
def part_build(args: argparse.Namespace) -> tuple[list[str], bool]:
    before, now = run_child("build", "before", args), run_child("build", "now", args)
    same = before["digest"] == now["digest"]
    what = "parameters and buffers" if args.device != "meta" else "random stream (meta: no values)"
    return [f"| build llama_{args.config}, bf16 on {args.device} | host peak | {before['peak_mib']:,.0f} MiB "
            f"({before['seconds']:.0f} s) | {now['peak_mib']:,.0f} MiB ({now['seconds']:.0f} s) | "
            f"{now['peak_mib'] / before['peak_mib']:.3f} | {what} identical: {'yes' if same else 'NO'} |"], same


def part_resume(args: argparse.Namespace) -> tuple[list[str], bool]:
    if args.device == "meta":
        return [f"| resume llama_{args.config} | — | — | — | — | needs --device cpu or cuda |"], True
    with tempfile.TemporaryDirectory(prefix="startup_memory-", dir=args.tmp) as tmp:
        written = run_child("write", "now", args, dir=tmp)
        before = run_child("resume", "before", args, dir=written["path"])
        now = run_child("resume", "now", args, dir=written["path"])
    rows = [f"| resume llama_{args.config} ({written['gib']:.1f} GiB checkpoint) to {args.device} | host, {kind} | "
            f"{before[key]:,.0f} MiB ({before['seconds']:.0f} s) | {now[key]:,.0f} MiB ({now['seconds']:.0f} s) | "
            f"{now[key] / max(before[key], 1e-9):.3f} | |"
            for kind, key in (("anonymous (the rank's own)", "anon_mib"),
                              ("VmHWM (with shared file pages)", "hwm_mib"))]
    return rows, True


def part_ddp(args: argparse.Namespace) -> tuple[list[str], bool]:
    before, now = run_child("ddp", "before", args)["peak_mib"], run_child("ddp", "now", args)["peak_mib"]
    memory = "device" if args.device.startswith("cuda") else "host, anonymous"
    return [f"| DDP llama_{args.config}, {accumulation} micro-batch(es) of {args.rows} x {args.length} | {memory} "
            f"peak of 2 updates | {before[accumulation]:,.0f} MiB | {now[accumulation]:,.0f} MiB | "
            f"{now[accumulation] / before[accumulation]:.3f} | |" for accumulation in before], True


TABLE_HEAD = ["| what | memory | before | now | now ÷ before | check |", "|---|---|---:|---:|---:|---|"]


def measure(args: argparse.Namespace, parts: list[str]) -> tuple[list[str], bool]:
    """The table rows of the chosen parts and whether every check passed (the builds are identical)."""
    lines, ok = [], True
    for part in parts:
        rows, passed = {"build": part_build, "resume": part_resume, "ddp": part_ddp}[part](args)
        lines += rows
        ok &= passed
    return lines, ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1b", help="configs/llama_<config>.json")
    parser.add_argument("--device", default=None, help="cuda (default when present), meta (else), or cpu")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--rows", type=int, default=4, help="rows per micro-batch (ddp)")
    parser.add_argument("--accumulations", default="1,2", help="micro-batches per update (ddp), comma-separated")
    parser.add_argument("--length", type=int, default=256, help="tokens per row (ddp)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="where the resume part writes its checkpoint (default: $TMPDIR)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="now", help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "meta"
    if args.device == "cuda":
        args.device = "cuda:0"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        raise SystemExit(f"--parts: choose from {', '.join(PARTS)}; got {args.parts!r}")
    if args.device.startswith("meta") and "ddp" in parts:
        parts.remove("ddp")
        print("(ddp needs --device cpu or cuda; skipped on meta)")
    rows, ok = measure(args, parts)
    print("\n".join(TABLE_HEAD + rows))
    print("all checks passed" if ok else "FAILED: the two builds differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
