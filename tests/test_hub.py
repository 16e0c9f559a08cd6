"""The hub path end to end, without the internet: a local hub-compatible server reached through HF_ENDPOINT.

What every user with a network runs first (`--dataset allenai/c4 --tokenizer t5-base`) goes through
`HfFileSystem` listing, `hf://` streaming and `AutoTokenizer.from_pretrained` over HTTP. Here the real
huggingface_hub / datasets / transformers clients do all of that against tests/hub_server.py, which serves the
shipped sample as a dataset repository in C4 layout and the shipped tokenizer as a model repository. The clients
read HF_ENDPOINT when they are imported, so the runs are subprocesses with it set (nothing is patched).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE, TOKENIZER, by_step, pretokenize_dir, read_metrics, run_main, run_subprocess, train_args
from tests.hub_server import LocalHub

DATASET, TOKENIZER_REPO = "alphadecay-test/c4", "alphadecay-test/tokenizer"


@pytest.fixture(scope="module")
def hub():
    with LocalHub({("datasets", DATASET): SAMPLE, ("models", TOKENIZER_REPO): TOKENIZER}) as server:
        yield server


def hub_env(hub, home) -> dict:
    """The clients pointed at the local hub, with an empty cache (the tokenizer is really downloaded)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.pop("HF_HUB_OFFLINE", None)
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    return env


def requested(hub, fragment: str) -> bool:
    return any(fragment in r for r in hub.requests)


@pytest.mark.slow
def test_training_from_the_hub_equals_training_from_the_local_copy_and_resumes(hub, tmp_path):
    flags = {"num_training_steps": 4, "save_every": 2, "eval_every": 2}
    hub_args = train_args(tmp_path / "hub", dataset=DATASET, tokenizer=TOKENIZER_REPO, **flags)
    env = hub_env(hub, tmp_path / "hf_home")
    done = run_subprocess(hub_args, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shutil.copytree(tmp_path / "hub" / "model_2", tmp_path / "resumed" / "model_2")
    resumed = run_subprocess(train_args(None, dataset=DATASET, tokenizer=TOKENIZER_REPO,
                                        continue_from=tmp_path / "resumed" / "model_2", **flags), env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert run_main(train_args(tmp_path / "local", **flags)) == 0

    from_hub, local = read_metrics(tmp_path / "hub"), read_metrics(tmp_path / "local")
    for key in ("loss", "eval_loss"):
        assert by_step(from_hub, key) == by_step(local, key), key  # the same shards, documents and tokenizer
    assert by_step(read_metrics(tmp_path / "resumed"), "loss") == {s: v for s, v in by_step(local, "loss").items() if s > 2}
    # The real client code went through the server: repository info, listings, ranged and streamed file reads.
    assert requested(hub, f"GET /api/datasets/{DATASET}/tree/main/en")
    assert requested(hub, f"/datasets/{DATASET}/resolve/") and requested(hub, f"/{TOKENIZER_REPO}/resolve/")
    assert requested(hub, f"HEAD /{TOKENIZER_REPO}/resolve/") and hub.unhandled == []
    cached = tmp_path / "hf_home" / "hub" / "models--alphadecay-test--tokenizer"
    assert any(p.name == "tokenizer.json" for p in cached.rglob("*"))


@pytest.mark.slow
def test_pretokenizing_from_the_hub_equals_pretokenizing_the_local_copy(hub, tmp_path):
    command = [sys.executable, "-m", "alphadecay.pretokenize", "--dataset", DATASET, "--tokenizer", TOKENIZER_REPO,
               "--out", str(tmp_path / "hub"), "--max_length", "64", "--max_rows", "900", "--workers", "2"]
    done = subprocess.run(command, cwd=REPO, env=hub_env(hub, tmp_path / "hf_home"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    pretokenize_dir(tmp_path / "local", max_rows=900)

    def files(directory):
        return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory)) if n.endswith(".bin")}

    assert files(tmp_path / "hub") == files(tmp_path / "local") and len(files(tmp_path / "local")) == 4
    meta_hub, meta_local = (json.loads((tmp_path / d / "pretokenized.json").read_text()) for d in ("hub", "local"))
    assert meta_hub["tokenizer_vocab_hash"] == meta_local["tokenizer_vocab_hash"]
    assert meta_hub["splits"]["train"]["source_shards"][0] == f"hf://datasets/{DATASET}/en/c4-train.00000-of-00008.json.gz"
    assert [s["rows"] for s in meta_hub["splits"]["train"]["shards"]] == [668, 232]
    assert hub.unhandled == []
