"""Nothing lost when a run fails: checkpoints that verify, a full disk, a flaky hub, a kill at any moment.

- checkpoint.py on synthetic directories: the manifest (any file layout), what verification catches, the newest
  checkpoint that verifies, pre-manifest checkpoints, pruning, the leftovers of dead processes, a failed write;
- LLaMA and ViT end to end: a damaged newest checkpoint is skipped and the resumed run equals the undamaged one;
  a damaged checkpoint named explicitly is one paragraph; a save that hits a real I/O error (RLIMIT_FSIZE) stops
  the run with one paragraph and leaves the earlier checkpoint intact;
- the hub (tests/hub_server.py with faults): connections dropped mid-shard and 503 answers beyond huggingface_hub's
  own retries, then a hub that stays down; two ranks agreeing to stop when one rank's data fails;
- SIGKILL inside a save (tests/kill_in_save.py) at points drawn by seed: the run directory resumes exactly.
"""

import base64
import gzip
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from alphadecay import checkpoint as ckpt
from alphadecay import dist
from alphadecay.config import parse_args
from alphadecay.errors import HubUnavailable, RunFault, UserError
from alphadecay.model import build_model, load_model_config
from alphadecay.optim import build_optimizer
from alphadecay.trainer import Trainer
from alphadecay.wd.groups import module_param_groups
from tests.conftest import (REPO, SAMPLE, SHORT_ALPHADECAY_FLAGS, TINY_CONFIG, by_step, free_port, read_metrics,
                            run_main, run_subprocess, run_vit, train_args, vit_args)
from tests.hub_server import LocalHub
from tests.test_hub import hub_env


# -- checkpoint.py on synthetic directories --------------------------------------------------------------------
def tiny_checkpoint(run_dir, step, value=0.0):
    """A ViT-style checkpoint (a module without save_pretrained) of a 2x2 Linear, through save_checkpoint."""
    model = torch.nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    state = {"step": step, "optimizer": {"moment": torch.full((2, 2), value)}}
    return ckpt.save_checkpoint(str(run_dir), step, model, state, {"model_ema": model.state_dict()})


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_manifest_covers_every_file_and_verification_catches_each_kind_of_damage(tmp_path):
    path = tiny_checkpoint(tmp_path, 3)
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert sorted(manifest["files"]) == ["model.safetensors", "model_ema.safetensors", "training_state.json",
                                         "training_state.pt"]
    assert manifest["checksum"] == "xxh3_128" and manifest["step"] == 3
    assert ckpt.verify_checkpoint(path) == ckpt.Verdict(True, True)
    assert os.listdir(tmp_path) == ["model_3"]  # no temporary left

    # Generic over the layout: a sharded checkpoint's subdirectory of files goes through the same manifest.
    shards = tmp_path / "sharded"
    (shards / "dcp").mkdir(parents=True)
    for i in range(2):
        (shards / "dcp" / f"__{i}_0.distcp").write_bytes(os.urandom(1000))
    ckpt.write_manifest(str(shards), 5)
    assert ckpt.verify_checkpoint(str(shards)).ok
    with open(shards / "dcp" / "__1_0.distcp", "r+b") as fh:  # one flipped byte, same size
        fh.seek(500)
        byte = fh.read(1)
        fh.seek(500)
        fh.write(bytes([byte[0] ^ 1]))
    verdict = ckpt.verify_checkpoint(str(shards))
    assert not verdict.ok and "__1_0.distcp does not match its xxh3_128 checksum" in verdict.problem
    assert ckpt.verify_checkpoint(str(shards), checksums=False).ok  # sizes alone cannot see it

    cut = os.path.join(path, "model.safetensors")
    size = os.path.getsize(cut)
    os.truncate(cut, size // 2)
    assert ckpt.verify_checkpoint(path).problem == (f"{cut} has {size // 2:,} bytes where the manifest says "
                                                    f"{size:,}")
    os.remove(cut)
    assert ckpt.verify_checkpoint(path).problem == f"{cut} is missing"


def test_a_run_directory_resumes_from_its_newest_checkpoint_that_verifies(tmp_path):
    for step in (2, 4, 6):
        tiny_checkpoint(tmp_path, step, value=step)
    os.truncate(tmp_path / "model_6" / "training_state.pt", 100)
    (tmp_path / "model_4" / "manifest.json").write_text('{"files": ')  # a manifest cut short
    found = ckpt.find_checkpoint(str(tmp_path))
    assert found.path == str(tmp_path / "model_2")
    assert len(found.notes) == 1 and "skipped 2 newer checkpoint(s) that do not verify: model_6 (" in found.notes[0]
    assert "training_state.pt has 100 bytes" in found.notes[0] and "model_4 (" in found.notes[0]
    assert "manifest.json is unreadable" in found.notes[0]

    with pytest.raises(UserError, match=r"--continue_from .*model_6: this checkpoint is damaged: .*training_state\.pt "
                                        r"has 100 bytes where the manifest says"):
        ckpt.find_checkpoint(str(tmp_path / "model_6"))
    shutil.rmtree(tmp_path / "model_2")
    with pytest.raises(UserError, match="no checkpoint of this run directory can be loaded: model_6 .*; model_4"):
        ckpt.find_checkpoint(str(tmp_path), "--resume")


def test_a_checkpoint_from_before_manifests_loads_with_a_note_unless_its_files_are_cut(tmp_path):
    for step in (2, 4):
        os.remove(os.path.join(tiny_checkpoint(tmp_path, step), "manifest.json"))
    found = ckpt.find_checkpoint(str(tmp_path))
    assert found.path == str(tmp_path / "model_4") and "has no manifest.json" in found.notes[0]
    weights, state = ckpt.load_checkpoint(found.path)
    assert state["step"] == 4 and set(weights) == {"weight", "bias"}
    path = tmp_path / "model_4" / "model_ema.safetensors"
    os.truncate(path, os.path.getsize(path) - 4)
    found = ckpt.find_checkpoint(str(tmp_path))
    assert found.path == str(tmp_path / "model_2")
    assert f"model_4 ({path} has " in found.notes[0] and "where its header says" in found.notes[0]
    os.truncate(tmp_path / "model_2" / "training_state.pt", 1000)
    with pytest.raises(UserError, match="training_state.pt is damaged"):
        ckpt.find_checkpoint(str(tmp_path / "model_2"))


def test_pruning_keeps_the_newest_and_leaves_a_later_checkpoint_alone(tmp_path):
    for step in (2, 4, 6, 10):
        tiny_checkpoint(tmp_path, step)
    assert ckpt.prune_checkpoints(str(tmp_path), None, 6) == []
    assert ckpt.prune_checkpoints(str(tmp_path), 2, 6) == ["model_2"]
    assert ckpt.checkpoint_steps(str(tmp_path)) == [4, 6, 10]  # model_10: from before a resume at 6; kept
    assert ckpt.prune_checkpoints(str(tmp_path), 1, 10) == ["model_4", "model_6"]
    assert sorted(os.listdir(tmp_path)) == ["model_10"]


def test_leftovers_of_dead_processes_are_removed_and_a_checkpoint_moved_aside_is_restored(tmp_path):
    tiny_checkpoint(tmp_path, 2)
    dead, alive, host = dead_pid(), os.getppid(), socket.gethostname()
    for name in (f".tmp-model_4-{dead}", f".tmp-model_4-{host}-{dead}", f".tmp-model_6-{host}-{alive}",
                 f".del-model_0-{host}-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    os.rename(tmp_path / "model_2", tmp_path / f"model_2.old-{host}-{dead}")  # killed between the two renames
    done = ckpt.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [f".tmp-model_6-{host}-{alive}", "model_2"]
    assert len(done) == 4 and any("restored" in d and "model_2" in d for d in done)
    assert ckpt.verify_checkpoint(str(tmp_path / "model_2")).ok


def test_a_failed_write_removes_its_temporary_and_says_what_was_needed_and_free(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path, 2)
    real_save = torch.save

    def full_disk(obj, fh):
        fh.write(b"half of it")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunFault) as caught:
        tiny_checkpoint(tmp_path, 4)
    message = str(caught.value)
    assert message.startswith(f"the checkpoint {tmp_path / 'model_4'} could not be written (No space left on device "
                              "[errno 28]). It needs about ")
    free = re.search(r"has [\d.]+ \w+ \(([\d,]+) bytes\) free", message)
    assert free and "the earlier checkpoints are intact (model_2)" in message
    assert sorted(os.listdir(tmp_path)) == ["model_2"] and ckpt.verify_checkpoint(str(tmp_path / "model_2")).ok
    monkeypatch.setattr(torch, "save", real_save)

    def bug(obj, fh):
        raise ValueError("not an I/O problem")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(ValueError):  # a bug keeps its traceback, and still leaves no temporary behind
        tiny_checkpoint(tmp_path, 4)
    assert sorted(os.listdir(tmp_path)) == ["model_2"]


def test_the_disk_space_warning_compares_free_space_with_two_checkpoints(tmp_path):
    model = build_model(load_model_config(TINY_CONFIG), seed=0)
    config, _ = parse_args(["--optimizer", "adamw", "--model_config", TINY_CONFIG])
    optimizer = build_optimizer(module_param_groups(model, 0.1), config, torch.device("cpu"))
    size = ckpt.estimate_checkpoint_bytes(model, optimizer)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert size == pytest.approx(3 * params, rel=0.01)  # weights + Adam's two moments, float32
    free = shutil.disk_usage(tmp_path).free
    assert ckpt.disk_space_warning(str(tmp_path), free // 2) == ""
    warning = ckpt.disk_space_warning(str(tmp_path), free // 2 + 1)
    assert warning.startswith(f"warning: {tmp_path} has ") and "room for the new one beside the last" in warning


# -- LLaMA end to end --------------------------------------------------------------------------------------------
ALPHADECAY = SHORT_ALPHADECAY_FLAGS  # the short_alphadecay_run fixture's flags


def test_llama_resumes_past_a_damaged_checkpoint_exactly_and_keeps_the_newest(short_alphadecay_run, tmp_path, capsys):
    """The issue's case: model_8's model.safetensors cut in half. --continue_from RUN_DIR skips it (saying why),
    resumes from model_4 and gives the undamaged run's numbers; the damaged checkpoint named explicitly is one
    paragraph; a dead process's temporary directory is removed at start; --keep_checkpoints 1 deletes model_4 only
    once the new model_8 is complete."""
    run = tmp_path / "run"
    shutil.copytree(short_alphadecay_run, run)
    weights = run / "model_8" / "model.safetensors"
    os.truncate(weights, os.path.getsize(weights) // 2)
    (run / f".tmp-model_6-{dead_pid()}").mkdir()
    capsys.readouterr()

    assert run_main(train_args(None, continue_from=run / "model_8", **ALPHADECAY)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --continue_from {run / 'model_8'}: this checkpoint is damaged: {weights} has ")
    assert err.count("\n") == 1

    assert run_main(train_args(run, continue_from=run, keep_checkpoints=1, **ALPHADECAY)) == 0
    out = capsys.readouterr().out
    assert f"note: removed {run}/.tmp-model_6-" in out
    assert (f"skipped 1 newer checkpoint(s) that do not verify: model_8 ({weights} has" in out
            and f"Resuming from {run / 'model_4'}, which verifies." in out)
    assert "resuming from update 4 of 8" in out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("model_", "."))) == ["model_8"]
    assert f"saved {run / 'model_8'} (deleted model_4: --keep_checkpoints)" in out
    assert ckpt.verify_checkpoint(str(run / "model_8")) == ckpt.Verdict(True, True)
    for key in ("loss", "eval_loss", "alpha/model.layers.1.mlp.up_proj"):
        assert by_step(read_metrics(run), key) == by_step(read_metrics(short_alphadecay_run), key), key


def test_a_save_hitting_an_io_error_stops_with_one_paragraph_and_keeps_the_last_checkpoint(short_alphadecay_run,
                                                                                          tmp_path, capsys):
    """A real failed write: the kernel refuses to grow any file past 6 MB (RLIMIT_FSIZE; training_state.pt needs
    9 MB), as a full disk refuses any byte. The run resumed from model_4 stops at its next save, says which file,
    the bytes needed and free, removes its temporary directory and leaves model_4 as it was."""
    run = tmp_path / "run"
    shutil.copytree(short_alphadecay_run / "model_4", run / "model_4")
    before = ckpt.verify_checkpoint(str(run / "model_4"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, hard))
    try:
        code = run_main(train_args(run, continue_from=run, **ALPHADECAY))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    err = capsys.readouterr().err
    assert code == 1, err
    err = err[err.index("error: "):]  # after the progress bar
    assert err.startswith(f"error: the checkpoint {run / 'model_8'} could not be written (File too large [errno 27])")
    assert re.search(r"It needs about 13\.\d MB \([\d,]+ bytes\); the file system holding \S+ has .* free\. The file "
                     r"system has room for it, so a quota or a file-size limit", err)
    assert "the earlier checkpoints are intact (model_4)" in err and err.count("\n") == 1 and "Traceback" not in err
    assert err.endswith(f"then resume with --continue_from {run}.\n")
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["model_4"]
    assert ckpt.verify_checkpoint(str(run / "model_4")) == before == ckpt.Verdict(True, True)


# -- ViT end to end ----------------------------------------------------------------------------------------------
def test_vit_resumes_past_a_damaged_checkpoint_and_keeps_save_ckpt_num(digits_subset, tmp_path, capsys):
    """3 epochs of 10 updates, --save_ckpt_num 2 (one implementation with --keep_checkpoints): model_20 and
    model_30 are left. model_30's training state loses its last byte; --auto_resume skips it, resumes at update
    20 and ends with the uninterrupted numbers and a model_30 that verifies."""
    flags = dict(epochs=3, save_ckpt_num=2, wd_scheduler="alphadecay", weight_decay=1e-3)
    assert run_vit(vit_args(digits_subset, tmp_path / "straight", **flags)) == 0
    assert sorted(p.name for p in (tmp_path / "straight").glob("model_*")) == ["model_20", "model_30"]
    shutil.copytree(tmp_path / "straight", tmp_path / "run")
    state = tmp_path / "run" / "model_30" / "training_state.pt"
    os.truncate(state, os.path.getsize(state) - 1)
    capsys.readouterr()
    assert run_vit(vit_args(digits_subset, tmp_path / "run", auto_resume="true", **flags)) == 0
    out = capsys.readouterr().out
    assert re.search(r"note: --auto_resume \S+: skipped 1 newer checkpoint\(s\) that do not verify: model_30 \(\S+"
                     r"training_state\.pt has [\d,]+ bytes where the manifest says", out), out
    assert "resuming" in out and "at update 20" in out and "epoch 3 (update 30)" in out
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "run")
    for key in ("loss", "top1", "eval_loss", "alpha/blocks.2.mlp.fc1"):
        assert by_step(resumed, key) == by_step(straight, key), key
    assert sorted(p.name for p in (tmp_path / "run").glob("model_*")) == ["model_20", "model_30"]
    assert ckpt.verify_checkpoint(str(tmp_path / "run" / "model_30")) == ckpt.Verdict(True, True)


# -- the hub: dropped connections, 503s, an outage ---------------------------------------------------------------
DATASET = "alphadecay-test/c4-large-shard"
SHARD = r"c4-train\.00000"
HUB_FLAGS = dict(num_training_steps=8, save_every=100, eval_every=4, shuffle_buffer=32)


@pytest.fixture(scope="module")
def large_shard(tmp_path_factory):
    """C4 layout with one 31 MB train shard: the sample's first 200 documents, each with 200 kB of incompressible
    padding in another field (dropped by select_columns). datasets parses 10 MB of JSON at a time (about 50 rows) and
    huggingface_hub fetches the compressed file in ranged blocks of 5 MB: the first two blocks hold the first
    chunk, so the third is first read after about 50 documents, around the third update: a fault there is
    mid-shard and mid-run."""
    root = tmp_path_factory.mktemp("large_shard")
    (root / "en").mkdir()
    with gzip.open(os.path.join(SAMPLE, "en", "c4-train.00000-of-00008.json.gz"), "rt") as fh:
        texts = [json.loads(line)["text"] for line in fh][:200]
    rng = random.Random(0)
    with gzip.open(root / "en" / "c4-train.00000-of-00001.json.gz", "wt", compresslevel=1) as fh:
        for text in texts:
            fh.write(json.dumps({"text": text, "pad": base64.b64encode(rng.randbytes(150_000)).decode()}) + "\n")
    for name in os.listdir(os.path.join(SAMPLE, "en")):
        if "validation" in name:
            shutil.copy(os.path.join(SAMPLE, "en", name), root / "en")
    return root


@pytest.fixture(scope="module")
def fault_free(large_shard, tmp_path_factory):
    """The same run from the local copy of the hub repository."""
    run_dir = tmp_path_factory.mktemp("fault_free")
    assert run_main(train_args(run_dir, dataset=large_shard, **HUB_FLAGS)) == 0
    return read_metrics(run_dir)


@pytest.mark.slow
def test_a_flaky_hub_is_retried_and_the_run_reads_exactly_the_same_documents(large_shard, fault_free, tmp_path):
    """Mid-shard (the third 5 MB block), the connection drops after 1 kB, then the hub answers 503 five times:
    huggingface_hub's own 5 retries are spent, so the stream waits, re-opens the shard and skips the documents it
    had yielded; the re-opened read gets one more 503, which the client retries. Exit 0, the same numbers."""
    with LocalHub({("datasets", DATASET): large_shard}) as hub:
        hub.drop(count=1, after_bytes=1000, pattern=SHARD, skip=4)
        hub.fail(count=6, pattern=SHARD)
        done = run_subprocess(train_args(tmp_path, dataset=DATASET, **HUB_FLAGS), env=hub_env(hub, tmp_path / "hf"),
                              timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert hub.faults_served == 7 and hub.unhandled == []
    assert re.search(r"warning: the data \(hf://datasets/alphadecay-test/c4-large-shard/en\): reading failed "
                     r"\(HfHubHTTPError: .*503.*\); retry 1 in 1 s", done.stderr)
    assert "Traceback" not in done.stderr
    for key in ("loss", "eval_loss", "tokens_seen"):
        assert by_step(read_metrics(tmp_path), key) == by_step(fault_free, key), key


@pytest.mark.slow
def test_a_hub_down_past_the_bound_saves_a_checkpoint_and_stops_and_the_run_resumes_exactly(large_shard, fault_free,
                                                                                             tmp_path):
    """From the third block on, every read of the shard gets 503: after --hub_retry_seconds 2 the run saves the
    last completed update and stops with exit code 75 and one paragraph; that checkpoint, resumed (here from the
    local copy of the same files), completes the run with the fault-free numbers."""
    with LocalHub({("datasets", DATASET): large_shard}) as hub:
        hub.fail(count=10**6, pattern=SHARD, skip=4)
        done = run_subprocess(train_args(tmp_path, dataset=DATASET, hub_retry_seconds=2, **HUB_FLAGS),
                              env=hub_env(hub, tmp_path / "hf"), timeout=400)
    assert done.returncode == 75, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    error = done.stderr[done.stderr.index("error: "):]
    assert error.count("\n") == 1 and "could not be read for" in error and "--hub_retry_seconds is 2" in error
    saved = re.search(r"The run stopped: update (\d+) is saved in (\S+)/model_\1\. Once the hub answers again, resume "
                      rf"with --continue_from {tmp_path}", error)
    assert saved, error
    step = int(saved.group(1))
    assert 1 <= step < 8 and ckpt.checkpoint_steps(str(tmp_path)) == [step]
    assert ckpt.verify_checkpoint(str(tmp_path / f"model_{step}")) == ckpt.Verdict(True, True)
    assert run_main(train_args(tmp_path, dataset=large_shard, continue_from=tmp_path, **HUB_FLAGS)) == 0
    for key in ("loss", "eval_loss", "tokens_seen"):
        assert by_step(read_metrics(tmp_path), key) == by_step(fault_free, key), key


def test_which_read_errors_of_a_remote_shard_are_retried():
    from alphadecay.data import is_transient

    def http_error(status):
        err = OSError(f"HTTP {status}")  # huggingface_hub's HfHubHTTPError is an OSError with a response
        err.response = type("Response", (), {"status_code": status})()
        return err

    for err in (http_error(503), http_error(500), http_error(429), ConnectionError("Server Disconnected"),
                TimeoutError(), FileNotFoundError("gzip://c4-train...::hf://..."), type("ReadError", (Exception,), {
                    "__module__": "httpx2._exceptions"})("peer closed connection")):
        assert is_transient(err), err
    for err in (http_error(404), http_error(401), PermissionError(), ValueError("bad JSON"), KeyError("text")):
        assert not is_transient(err), err


class FailingBatches:
    """Stands in for hub-streamed TokenBatches: `fail_at` batches in, the data is gone for good."""

    remote = True

    def __init__(self, fail_at):
        self.count, self.fail_at = 0, fail_at

    def __next__(self):
        self.count += 1
        if self.count == self.fail_at:
            raise HubUnavailable("rank 1's data could not be read.")
        return {}, {"batch": self.count}


def _agreement_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    info = dist.DistInfo(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
    config, _ = parse_args(["--model_config", TINY_CONFIG])
    raw = build_model(load_model_config(TINY_CONFIG), seed=0)
    trainer = Trainer.for_updates(config, info, raw, build_optimizer(module_param_groups(raw, 0.1), config,
                                                                     info.device))
    batches = FailingBatches(fail_at=3 if rank == 1 else 10**6)
    trainer.train_batches, trainer.run_dir, saves = batches, "RUN", []
    trainer.save = lambda: saves.append(trainer.state.step)
    outcome = None
    for step in range(5):
        try:
            trainer.next_micro_batches(batches)
        except HubUnavailable as err:
            outcome = (step, str(err))
            break
        trainer.state.step = step + 1
    torch.save({"outcome": outcome, "saves": saves}, os.path.join(out, f"rank{rank}.pt"))
    torch_dist.destroy_process_group()


def test_when_one_ranks_data_fails_every_rank_saves_the_same_update_and_stops(tmp_path):
    mp.spawn(_agreement_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        step, message = result["outcome"]
        assert step == 2 and result["saves"] == [2], result
        assert message.startswith("rank 1's data could not be read. The run stopped: update 2 is saved in RUN/model_2")


# -- SIGKILL inside a save ----------------------------------------------------------------------------------------
KILL_FLAGS = dict(num_training_steps=6, save_every=2, eval_every=2, keep_checkpoints=1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert run_main(train_args(run_dir, **KILL_FLAGS)) == 0
    return read_metrics(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 29, 27])
def test_a_run_killed_inside_a_save_resumes_from_a_checkpoint_that_verifies_exactly(uninterrupted, tmp_path, seed,
                                                                                     capsys):
    """SIGKILL before one of the 21 file-system operations of the second save (model_4, then pruning model_2), or
    just after them, at the point the seed draws from 1..22: the run directory resumes from a checkpoint that
    verifies (model_4 or model_2), every leftover is removed, and the resumed run ends with the uninterrupted run's
    numbers. With transformers 5.24 the seeds' points are: 0, an fsync of a written file before the manifest; 29,
    the rename of the complete temporary directory to model_4; 27, the deletion of model_2 (renamed aside)."""
    event = random.Random(seed).randint(1, 22)
    command = [sys.executable, str(REPO / "tests" / "kill_in_save.py"), "2", str(event)] + train_args(tmp_path,
                                                                                                       **KILL_FLAGS)
    killed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert "killed before:" in killed.stdout
    capsys.readouterr()
    assert run_main(train_args(tmp_path, continue_from=tmp_path, **KILL_FLAGS)) == 0
    out = capsys.readouterr().out
    resumed_at = int(re.search(r"resuming from update (\d+) of 6", out).group(1))
    assert resumed_at in (2, 4) and "do not verify" not in out
    assert sorted(os.listdir(tmp_path)) == ["config.json", "metrics.jsonl", "model_6"]
    assert ckpt.verify_checkpoint(str(tmp_path / "model_6")) == ckpt.Verdict(True, True)
    for key in ("loss", "eval_loss"):
        assert by_step(read_metrics(tmp_path), key) == by_step(uninterrupted, key), key
