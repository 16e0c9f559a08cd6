"""torchrun_main.py, SIGKILLed at a chosen moment inside a checkpoint save (for tests/test_faults.py).

    python tests/kill_in_save.py SAVE EVENT [training flags...]

counts, during the SAVE-th save (1 = the first), the file-system operations of checkpoint writing and pruning
(directory creation, opening a file to write, fsync, rename, recursive delete) and kills the process with SIGKILL
just before the EVENT-th of them; a save with fewer operations is killed just after it returns. Nothing in
alphadecay/ knows about this: the wrapper replaces os and builtins functions in this process only. It prints the
operation it killed at (`killed before: ...`) on stdout.
"""

from __future__ import annotations

import builtins
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchrun_main  # noqa: E402
from alphadecay import trainer  # noqa: E402

SAVE, EVENT = int(sys.argv[1]), int(sys.argv[2])
count = {"save": 0, "event": 0, "active": False}


def kill(what: str) -> None:
    print(f"killed before: {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def event(what: str) -> None:
    if count["active"]:
        count["event"] += 1
        if os.environ.get("KILL_IN_SAVE_VERBOSE"):
            print(f"event {count['event']}: {what}", flush=True)
        if count["event"] == EVENT:
            kill(what)


def counted(fn, name: str, when=lambda *a, **k: True):
    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            event(f"{name} {args[0] if args else ''}")
        return fn(*args, **kwargs)
    return wrapper


os.makedirs = counted(os.makedirs, "makedirs")
os.fsync = counted(os.fsync, "fsync")
os.replace = counted(os.replace, "rename")
shutil.rmtree = counted(shutil.rmtree, "rmtree")
builtins.open = counted(builtins.open, "open to write",
                        when=lambda file, mode="r", *a, **k: any(c in mode for c in "wax+"))


original_save, original_prune = trainer.save_checkpoint, trainer.prune_checkpoints


def save(*args, **kwargs):  # the trainer's save: save_checkpoint, then prune_checkpoints
    count["save"] += 1
    count["active"] = count["save"] == SAVE
    return original_save(*args, **kwargs)


def prune(*args, **kwargs):
    result = original_prune(*args, **kwargs)
    if count["active"]:
        kill("nothing: after the save and its pruning")
    return result


trainer.save_checkpoint, trainer.prune_checkpoints = save, prune

if __name__ == "__main__":
    sys.exit(torchrun_main.main(sys.argv[3:]))
