"""Checkpoints: one save and one load path for periodic, final and signal-triggered saves, which never lose a
checkpoint and never load a damaged one.

Layout of `<save_dir>/model_<step>/` (step = updates completed):
- the model in `save_pretrained` format (config.json + model.safetensors), loadable with
  `LlamaForCausalLM.from_pretrained`; a model without `save_pretrained` (the ViT) as its state_dict in
  model.safetensors, and any extra weights (the ViT's EMA) as <name>.safetensors;
- training_state.pt: optimizer (its param groups carry the current per-group decays), weight-decay scheduler
  state, step, tokens seen, every rank's data-stream position and RNG states, the wandb run id, the config;
- training_state.json: the counters in readable form;
- manifest.json, written last: every other file of the directory (any layout, subdirectories included, so a
  sharded checkpoint of DCP files goes through the same code) with its size in bytes and its xxh3_128 checksum.

Writing (`save_checkpoint`; an FSDP run's sharded checkpoint, alphadecay/sharded_checkpoint.py, ends the same way
through `publish_checkpoint`): every file goes to `.tmp-model_<step>-<host>-<pid>/`; each is read back for its
checksum and fsynced, the manifest is written and fsynced, then the directory; the directory is renamed to
`model_<step>` and the run directory fsynced. A process killed at any moment leaves the earlier checkpoints as
they were and at most a temporary directory, which the next start removes (`remove_stale_temporaries`). A write
that fails (a full disk, a quota, any I/O error) removes its temporary directory and raises a `RunFault` that
gives the bytes needed and free.

Reading (`find_checkpoint`): a checkpoint verifies when every file of its manifest is there with its size and
checksum. A run directory resumes from its newest checkpoint that verifies, naming those it skipped and why; a
checkpoint given by name that does not verify is an error naming the file. A checkpoint written before manifests
existed is loaded if its files are whole (the safetensors headers cover their files, the training state's zip
directory and CRCs are intact) and called unverified.

Why xxh3_128 (the xxhash package, a dependency of datasets): on this project's 2-core CPU machine, hashing in
memory ran at 21 GB/s for xxh3_128 against 4.3 GB/s for zlib's crc32 and 1.8 GB/s for sha256. A 1B-parameter run
saves ~13 GB of state; sha256 would add ~7 s per save and per resume on one core, xxh3_128 under 1 s, so reading
the disk dominates. The checksum is there to catch truncation and corruption, not tampering, for which a 128-bit
non-cryptographic hash is ample.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alphadecay.errors import RunFault, UserError

STATE_FILE = "training_state.pt"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alphadecay-checkpoint"
CHECKSUM = "xxh3_128"
_CHUNK = 8 << 20
_CHECKPOINT = re.compile(r"model_(\d+)")
# What an interrupted save leaves: .tmp-model_<step>-<host>-<pid> (before manifests: .tmp-model_<step>-<pid>),
# model_<step>.old-<host>-<pid> (a checkpoint being replaced), .del-<name>-<host>-<pid> (one being deleted).
_TEMPORARY = re.compile(r"\.tmp-model_(\d+)-(?:(.+)-)?(\d+)")
_OLD = re.compile(r"model_(\d+)\.old-(?:(.+)-)?(\d+)")
_DELETED = re.compile(r"\.del-model_(\d+)(?:\.old-.+)?-(?:(.+)-)?(\d+)")


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"model_{step}")


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps of the run directory's model_<step> directories, oldest first (complete or not)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for d in os.listdir(run_dir) if (m := _CHECKPOINT.fullmatch(d))
                  and os.path.isdir(os.path.join(run_dir, d)))


# ------------------------------------------------------------------------------------------------------------
# Checksums and the manifest
# ------------------------------------------------------------------------------------------------------------
def _hasher(algorithm: str):
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    import hashlib

    return hashlib.new(algorithm)  # sha256 and the like, should a manifest name one


def file_checksum(path: str, algorithm: str = CHECKSUM, sync: bool = False) -> tuple[int, str]:
    """(size in bytes, hex checksum) of a file; with `sync`, also fsync it (written by someone else's code, e.g.
    save_pretrained, so we cannot fsync it while writing)."""
    digest, size = _hasher(algorithm), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return size, digest.hexdigest()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_files(directory: str) -> list[str]:
    """Every file under `directory` but the manifest, as sorted '/'-separated relative paths."""
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def write_manifest(directory: str, step: int) -> dict:
    """Checksum and fsync every file of `directory`, then write and fsync manifest.json and the directories."""
    files = {}
    for rel in checkpoint_files(directory):
        size, digest = file_checksum(os.path.join(directory, rel), sync=True)
        files[rel] = {"bytes": size, CHECKSUM: digest}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "step": step, "checksum": CHECKSUM, "files": files}
    with open(os.path.join(directory, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    for root, _, _ in os.walk(directory, topdown=False):  # subdirectories (sharded checkpoints) before the top
        fsync_dir(root)
    return manifest


@dataclass
class Verdict:
    """What `verify_checkpoint` found: ok (loadable), verified (by a manifest; False for a checkpoint written
    before manifests existed) and, when not ok, the problem in words, naming the file."""

    ok: bool
    verified: bool
    problem: str = ""


def verify_checkpoint(path: str, checksums: bool = True) -> Verdict:
    """Does the checkpoint directory `path` hold what its manifest lists (sizes, and with `checksums` the content)?
    Without a manifest: are its files whole (an unverified checkpoint from before manifests)?"""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        return _check_unverified(path)
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        files, algorithm = manifest["files"], manifest["checksum"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return Verdict(False, True, f"{manifest_path} is unreadable ({type(err).__name__}: {err})")
    for rel, expected in files.items():
        file_path = os.path.join(path, rel)
        if not os.path.isfile(file_path):
            return Verdict(False, True, f"{file_path} is missing")
        size = os.path.getsize(file_path)
        if size != expected["bytes"]:
            return Verdict(False, True, f"{file_path} has {size:,} bytes where the manifest says "
                                        f"{expected['bytes']:,}")
    if checksums:
        for rel, expected in files.items():
            file_path = os.path.join(path, rel)
            if file_checksum(file_path, algorithm)[1] != expected[algorithm]:
                return Verdict(False, True, f"{file_path} does not match its {algorithm} checksum in the manifest "
                                            "(its content changed after it was written)")
    return Verdict(True, True)


def _check_unverified(path: str) -> Verdict:
    """A checkpoint without a manifest: its training state's zip directory and CRCs, and that each safetensors
    header covers its file exactly."""
    state = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state):
        return Verdict(False, False, f"{state} is missing")
    try:
        with zipfile.ZipFile(state) as archive:
            bad = archive.testzip()
        if bad is not None:
            return Verdict(False, False, f"{state} is damaged (entry {bad} fails its CRC)")
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return Verdict(False, False, f"{state} is damaged ({err})")
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(path, name))
            if problem:
                return Verdict(False, False, problem)
    return Verdict(True, False)


def _safetensors_problem(path: str) -> str:
    """'' when the safetensors header parses and its tensors end exactly at the end of the file."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length <= 0 or 8 + length > size:
                return f"{path} is cut short ({size:,} bytes; its header alone needs {8 + length:,})"
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as err:
        return f"{path} has an unreadable header ({err})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{path} has {size:,} bytes where its header says {8 + length + end:,}"
    return ""


# ------------------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------------------
def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested structure of dicts, lists and tuples (a state_dict, an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def estimate_checkpoint_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                              extra: tuple[torch.nn.Module, ...] = ()) -> int:
    """A checkpoint's size before the first one exists: the model's and `extra` modules' (the EMA) state_dicts,
    plus the optimizer's state, or, before its first step, Adam's two moments per trainable parameter."""
    size = sum(tensor_bytes(m.state_dict()) for m in (model, *extra))
    if optimizer is not None:
        state = tensor_bytes(list(optimizer.state.values()))
        params = sum(tensor_bytes(p) for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
        size += state or 2 * params
    return size


def disk_space_warning(run_dir: str, checkpoint_bytes: int) -> str:
    """A warning when the file system holding `run_dir` has room for fewer than two checkpoints (a save writes the
    new one beside the last), else ''."""
    free = shutil.disk_usage(run_dir).free
    if free >= 2 * checkpoint_bytes:
        return ""
    return (f"warning: {run_dir} has {_size(free)} free, but a checkpoint of this run takes about "
            f"{_size(checkpoint_bytes)} and a save needs room for the new one beside the last "
            f"({_size(2 * checkpoint_bytes)}); a save that runs out of space stops the run (the checkpoints "
            f"already written stay intact). Free space or give another --save_dir/--output_dir.")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def save_checkpoint(run_dir: str, step: int, model: torch.nn.Module, state: dict[str, Any],
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None,
                    resume_flag: str = "--continue_from") -> str:
    """Write model_<step> so that it is either complete and verifiable or absent; `state` is everything but the
    weights; `extra_weights` maps a file stem to a state_dict saved beside the model. Returns the directory.

    A failed write removes its temporary directory and raises a RunFault (bytes needed and free, and how to
    resume: `resume_flag`); a model_<step> that already exists (a damaged one, skipped at resume) is replaced only
    by a complete new one."""
    final = checkpoint_dir(run_dir, step)
    tmp = temporary_dir(run_dir, step)
    weights = {} if hasattr(model, "save_pretrained") else {"model": model.state_dict()}
    weights.update(extra_weights or {})
    needed = tensor_bytes(model.state_dict()) + tensor_bytes(extra_weights or {}) + tensor_bytes(state)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True)
        for stem, tensors in weights.items():
            save_file({k: v.detach().contiguous() for k, v in tensors.items()},
                      os.path.join(tmp, f"{stem}.safetensors"))
        write_training_state(tmp, state)
        publish_checkpoint(tmp, run_dir, step)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = io_failure(err)
        if cause is None:
            raise
        raise RunFault(save_failure_message(run_dir, final, cause, needed, resume_flag)) from None
    return final


def write_training_state(directory: str, state: dict[str, Any]) -> None:
    """training_state.pt (`state`: everything but the weights) and training_state.json (its counters, readable)
    in `directory`, for both checkpoint layouts."""
    with open(os.path.join(directory, STATE_FILE), "wb") as fh:  # a Python file: a failed write is an OSError
        torch.save(state, fh)
    readable = {k: state[k] for k in ("step", "epoch", "tokens_seen", "train_time", "wandb_id", "format") if k in state}
    with open(os.path.join(directory, "training_state.json"), "w") as fh:
        json.dump(readable, fh, indent=2)


def temporary_dir(run_dir: str, step: int) -> str:
    """Where a save of model_<step> writes before the rename: named after this host and process, so that
    `remove_stale_temporaries` can tell a dead writer's leftovers from a live one's."""
    return os.path.join(run_dir, f".tmp-model_{step}-{_owner()}")


def publish_checkpoint(tmp: str, run_dir: str, step: int) -> str:
    """The end of every save, once all of model_<step>'s files are in the temporary directory `tmp` (written by
    this process or, for a sharded checkpoint, by every rank): the manifest over all of them, written last, then
    the rename into place and the run directory's fsync. A model_<step> that exists already (only ever a damaged
    checkpoint being replaced) is moved aside first and deleted after. Returns the checkpoint's directory."""
    final = checkpoint_dir(run_dir, step)
    write_manifest(tmp, step)
    if os.path.exists(final):  # only ever a checkpoint being replaced: move it aside, then put ours in place
        old = f"{final}.old-{_owner()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(run_dir)
        _delete(old)
    else:
        os.replace(tmp, final)
        fsync_dir(run_dir)
    return final


def io_failure(err: BaseException) -> str | None:
    """The I/O error behind a failed write, in words, or None when it is not one (a bug: re-raised as is).
    safetensors reports one as 'I/O error: ... (os error N)', torch.save as a RuntimeError whose context is the
    OSError of the file object it wrote to."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            return f"{seen.strerror or seen}" + (f" [errno {seen.errno}]" if seen.errno else "")
        seen = seen.__cause__ or seen.__context__
    if "I/O error" in str(err) or "os error" in str(err):
        return str(err).split("\n")[0]
    return None


def save_failure_message(run_dir: str, path: str, cause: str, needed: int, resume_flag: str) -> str:
    free = shutil.disk_usage(run_dir).free if os.path.isdir(run_dir) else 0
    kept = [f"model_{s}" for s in checkpoint_steps(run_dir)]
    room = ("" if free < needed else " The file system has room for it, so a quota or a file-size limit (ulimit -f) "
            "is the likely limit.")
    then = (f"Free space (or move the run directory to a larger disk), then resume with {resume_flag} {run_dir}."
            if kept else "Free space (or choose another directory), then start the run again.")
    return (f"the checkpoint {path} could not be written ({cause}). It needs about {_size(needed)}; the file system "
            f"holding {run_dir} has {_size(free)} free.{room} The partial write was removed and the earlier "
            f"checkpoints are intact ({', '.join(kept) if kept else 'none yet'}). {then}")


def prune_checkpoints(run_dir: str, keep: int | None, step: int) -> list[str]:
    """After model_<step> is complete, delete the checkpoints before it beyond the newest `keep` (it included);
    None keeps all. Checkpoints after `step` (a damaged one this run will rewrite) are left alone. Returns the
    deleted names. One implementation for --keep_checkpoints (LLaMA) and --save_ckpt_num (ViT)."""
    if keep is None:
        return []
    older = [s for s in checkpoint_steps(run_dir) if s < step]
    doomed = older[:max(0, len(older) - (keep - 1))]
    for s in doomed:
        _delete(checkpoint_dir(run_dir, s))
    return [f"model_{s}" for s in doomed]


def _delete(path: str) -> None:
    """Rename, then remove: a process killed while deleting leaves a .del- directory (removed at the next start),
    never a half-deleted model_<step> that could pass for a checkpoint."""
    doomed = os.path.join(os.path.dirname(path), f".del-{os.path.basename(path)}-{_owner()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """At a run's start: remove the temporary directories that saves of dead processes left behind, and put back a
    checkpoint that a replacing save had moved aside when it died. Returns what was done, in words.

    A temporary of a process alive on this host is left alone; one from another host is taken to be dead (a run
    directory belongs to one run at a time)."""
    if not os.path.isdir(run_dir):
        return []
    host, done = socket.gethostname(), []
    for name in sorted(os.listdir(run_dir)):
        path = os.path.join(run_dir, name)
        match = _TEMPORARY.fullmatch(name) or _OLD.fullmatch(name) or _DELETED.fullmatch(name)
        if match is None or not os.path.isdir(path) or _alive(match.group(2) or host, int(match.group(3)), host):
            continue
        final = checkpoint_dir(run_dir, int(match.group(1)))
        if _OLD.fullmatch(name) and not os.path.exists(final):
            os.replace(path, final)
            done.append(f"restored {final} from {name} (a save replacing it was interrupted)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by an interrupted save or deletion")
    return done


def _alive(host: str, pid: int, this_host: str) -> bool:
    if host != this_host or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# ------------------------------------------------------------------------------------------------------------
# Finding and loading
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Found:
    """The checkpoint to load and what to tell the user about the choice (skipped checkpoints, an unverified one)."""

    path: str
    notes: list[str] = field(default_factory=list)


def is_checkpoint_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, STATE_FILE)) or os.path.isfile(os.path.join(path, MANIFEST))


def find_checkpoint(path: str, flag: str = "--continue_from") -> Found:
    """`path` itself if it is a checkpoint (which must verify), else the run directory's newest checkpoint that
    verifies; a UserError when there is none. `flag` names the command-line flag in messages."""
    if is_checkpoint_dir(path):
        verdict = verify_checkpoint(path)
        if not verdict.ok:
            raise UserError(f"{flag} {path}: this checkpoint is damaged: {verdict.problem}. It cannot be loaded; "
                            f"resume from an earlier checkpoint of {os.path.dirname(os.path.abspath(path))} (give the "
                            f"run directory itself to take the newest one that verifies).")
        return Found(path, [] if verdict.verified else [_unverified_note(path)])
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory.")
    notes, skipped = [], []
    for step in reversed(checkpoint_steps(path)):
        candidate = checkpoint_dir(path, step)
        verdict = verify_checkpoint(candidate)
        if verdict.ok:
            if skipped:
                notes.append(f"note: {flag} {path}: skipped {len(skipped)} newer checkpoint(s) that do not verify: "
                             + "; ".join(skipped) + f". Resuming from {candidate}, which "
                             + ("verifies." if verdict.verified else "has no manifest (see below)."))
            if not verdict.verified:
                notes.append(_unverified_note(candidate))
            return Found(candidate, notes)
        skipped.append(f"model_{step} ({verdict.problem})")
    if skipped:
        raise UserError(f"{flag} {path}: no checkpoint of this run directory can be loaded: "
                        + "; ".join(skipped) + ". Start the run anew (another --save_dir), or restore a copy.")
    raise UserError(f"{flag} {path}: neither a checkpoint (a model_<step> directory with {STATE_FILE}) "
                    f"nor a run directory containing one.")


def _unverified_note(path: str) -> str:
    return (f"note: {path} has no {MANIFEST} (it was written before checkpoints carried one): its files are whole "
            "but their content cannot be verified; loading it as it is.")


def latest_checkpoint(run_dir: str) -> str | None:
    """The run directory's checkpoint with the most updates (this run's own: not verified), or None."""
    steps = checkpoint_steps(run_dir)
    return checkpoint_dir(run_dir, steps[-1]) if steps else None


def find_model_dir(path: str) -> str:
    """`path` itself when it holds model weights (a save_pretrained directory or a checkpoint, which must verify
    when it has a manifest), else the newest checkpoint of the run directory `path` that verifies: what the
    model-reading command lines (evaluate, esd) accept. Notes on skipped checkpoints go to stderr."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    if any(os.path.isfile(os.path.join(path, w)) for w in weights) and not is_checkpoint_dir(path):
        return path
    if not (is_checkpoint_dir(path) or checkpoint_steps(path)):
        raise UserError(f"{path}: neither a save_pretrained model directory (config.json + model.safetensors or "
                        f"pytorch_model.bin), a checkpoint model_<step>, nor a run directory holding one.")
    found = find_checkpoint(path, flag="PATH")
    for note in found.notes:
        print(note, file=sys.stderr)
    return found.path


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (on `device`) and the training state of a checkpoint directory (verified by `find_checkpoint`),
    without a host copy of either.

    safetensors reads the weights from the file's memory map to `device` one tensor at a time. training_state.pt
    (torch.save's zip format) is memory-mapped: its tensors (the optimizer state) are read from the page cache,
    which the ranks of a node share, when optimizer.load_state_dict copies them to the parameters' device (on the
    CPU the optimizer keeps them as copy-on-write pages of the map, and the file is never written)."""
    weights = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    return weights, load_training_state(path)


def load_training_state(path: str) -> dict[str, Any]:
    """training_state.pt of a checkpoint directory (either layout), memory-mapped (`load_checkpoint`). Our own
    file, written by `write_training_state`: it holds numpy RNG states, so not weights_only."""
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False, mmap=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
