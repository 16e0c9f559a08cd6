"""Training from pretokenized rows: the same losses on 1 or 2 processes, resume across world sizes, epochs, bad input."""

import json
import os
import shutil

import pytest
import torch

from alphadecay import dist, pretokenized, run
from alphadecay.data import RowSpec
from alphadecay.errors import UserError
from tests.conftest import (TORCHRUN, TOKENIZER, by_step, free_port, pretokenize_dir, read_metrics, run_main,
                            run_subprocess, train_args)



@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The shipped sample's first 600 train rows and its whole validation split, rows of 64 tokens."""
    return pretokenize_dir(tmp_path_factory.mktemp("rows") / "c4_64", max_rows=600)


def args(save_dir, rows, **overrides):
    flags = {"dataset": rows, "num_training_steps": 8, "save_every": 4, "eval_every": 4, "target_eval_tokens": 3000}
    return train_args(save_dir, **{**flags, **overrides})


@pytest.fixture(scope="module")
def two_ranks(rows, tmp_path_factory):
    """8 updates on 2 gloo processes, micro-batch 4 per rank (no accumulation), checkpoints after 4 and 8."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    done = run_subprocess(args(run_dir, rows, batch_size=4), launcher=TORCHRUN + [f"--master_port={free_port()}"],
                          env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir


def close(a: dict, b: dict, tol=1e-5) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[k] - b[k]) <= tol for k in a)


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_losses(rows, two_ranks, tmp_path):
    # 1 process, micro-batch 2 x 4 accumulation steps; 2 processes, micro-batch 4 each: the same global batches.
    assert run_main(args(tmp_path, rows, batch_size=2)) == 0
    one, two = read_metrics(tmp_path), read_metrics(two_ranks)
    assert sorted(by_step(one, "loss")) == list(range(1, 9))
    assert close(by_step(one, "loss"), by_step(two, "loss"))
    assert close(by_step(one, "eval_loss"), by_step(two, "eval_loss")) and sorted(by_step(one, "eval_loss")) == [4, 8]
    assert by_step(one, "tokens_seen") == by_step(two, "tokens_seen")
    assert set(by_step(one, "epoch").values()) == {0}


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(rows, two_ranks, tmp_path):
    shutil.copytree(two_ranks / "model_4", tmp_path / "model_4")
    assert run_main(args(None, rows, batch_size=8, continue_from=tmp_path / "model_4")) == 0
    resumed, reference = by_step(read_metrics(tmp_path), "loss"), by_step(read_metrics(two_ranks), "loss")
    assert close(resumed, {s: v for s, v in reference.items() if s > 4})
    state = torch.load(two_ranks / "model_4" / "training_state.pt", weights_only=False)
    assert state["data"] == [{"kind": "pretokenized", "update": 4, "epoch": 0, "row": 32, "rows": 600}] * 2


def test_a_run_longer_than_the_data_starts_new_epochs(tmp_path, capsys):
    small = pretokenize_dir(tmp_path / "small", max_rows=20)  # 20 rows, 8 per update: 2 updates per epoch
    assert run_main(args(tmp_path / "run", small, num_training_steps=5, save_every=100, eval_every=100)) == 0
    assert list(by_step(read_metrics(tmp_path / "run"), "epoch").values()) == [0, 0, 1, 1, 2]
    out = capsys.readouterr().out
    assert "epoch 0 of the pretokenized train split ends after update 2 (4 of 20 rows left" in out
    assert "epoch 1 starts with update 3, in a new order" in out


# -- bad input: one paragraph, exit code 2, before any training ------------------------------------------------
def damaged_copy(rows, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(rows, copy)
    damage(copy)
    return copy


def edit_metadata(change):
    def damage(copy):
        meta = json.loads((copy / pretokenized.META_FILE).read_text())
        change(meta)
        (copy / pretokenized.META_FILE).write_text(json.dumps(meta))
    return damage


def truncate(copy):
    with open(copy / "train-00000.bin", "r+b") as fh:
        fh.truncate(os.path.getsize(copy / "train-00000.bin") - 10)


def replace_by_folder(copy):
    os.remove(copy / "validation-00001.bin")
    os.mkdir(copy / "validation-00001.bin")


def other_tokenizer(tmp_path):
    from alphadecay.data import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER, 64)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_id_0>"]})
    tokenizer.save_pretrained(tmp_path / "tok2")
    return str(tmp_path / "tok2")


@pytest.mark.parametrize("case", ["tokenizer", "max_length", "packing", "truncated", "unreadable", "missing",
                                  "incomplete", "metadata"])
def test_bad_pretokenized_input_is_one_clear_error_before_training(rows, tmp_path, capsys, case):
    dataset, overrides = rows, {}
    if case == "tokenizer":
        overrides = {"tokenizer": other_tokenizer(tmp_path)}
        needle = (f"--tokenizer {overrides['tokenizer']} (vocabulary sha256:", "8001 ids) is not the tokenizer that "
                  f"made the rows in {rows}: {TOKENIZER} (vocabulary sha256:", "8000 ids)")
    elif case == "max_length":
        overrides = {"max_length": 128}
        needle = (f"--max_length 128 differs from the rows in {rows}: max_length 64",)
    elif case == "packing":
        overrides = {"packing": True}
        needle = (f"--packing true differs from the rows in {rows}: packing false", "Train without --packing")
    elif case == "truncated":
        dataset = damaged_copy(rows, tmp_path, truncate)
        needle = (f"shard {dataset}/train-00000.bin has", "(truncated or damaged)")
    elif case == "unreadable":
        dataset = damaged_copy(rows, tmp_path, replace_by_folder)
        needle = (f"shard {dataset}/validation-00001.bin cannot be read",)
    elif case == "missing":
        dataset = damaged_copy(rows, tmp_path, lambda copy: os.remove(copy / "validation-00000.bin"))
        needle = (f"shard {dataset}/validation-00000.bin cannot be read", "No such file")
    elif case == "incomplete":
        dataset = damaged_copy(rows, tmp_path, edit_metadata(lambda m: m["splits"]["validation"].update(complete=False)))
        needle = ("the validation split is incomplete", "run the same `python -m alphadecay.pretokenize` command again")
    else:
        dataset = damaged_copy(rows, tmp_path, lambda copy: (copy / pretokenized.META_FILE).write_text("{"))
        needle = (f"{dataset}/{pretokenized.META_FILE} cannot be read",)
    assert run_main(args(tmp_path / "run", str(dataset), **overrides)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(n in err for n in needle), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_refuses_another_kind_of_data_and_streaming_refuses_another_world_size(rows):
    info = dist.DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    batches = pretokenized.open_dataset(rows).train_batches(RowSpec(64, 0, 1, False, True), seed=0, total_batch_size=8,
                                                            batch_size=8, rank=0, world_size=1)
    streamed = {"data": [{"documents": {}, "carry": []}] * 2, "world_size": 2}
    with pytest.raises(UserError, match="trained on streamed data, but this run's --dataset is pretokenized"):
        run.restore(streamed, None, None, batches, info)

    class Stream:  # data.TokenBatches as restore() sees it
        pass

    with pytest.raises(UserError, match=r"written by 2 process\(es\); resume it with the same number .*or train from "
                                        r"pretokenized data"):
        run.restore(streamed, None, None, Stream(), info)
    with pytest.raises(UserError, match="trained on pretokenized data, but this run's --dataset is streamed"):
        run.restore({"data": [batches.state_dict()], "world_size": 1}, None, None, Stream(), info)
