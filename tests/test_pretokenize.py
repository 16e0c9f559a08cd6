"""Pretokenized rows: equal to the streaming rows, independent of the worker count, resumable, read back exactly."""

import gzip
import json
import os
import shutil

import numpy as np
import pytest
import torch

from alphadecay import data, pretokenize, pretokenized
from alphadecay.errors import UserError
from tests.conftest import SAMPLE, TOKENIZER, pretokenize_dir


def small_c4(root, shards=4, validation_docs=40):
    """A C4-layout directory of real text: the shipped sample's validation documents dealt into `shards` train
    shards (uneven sizes) and one validation shard. Returns (train texts, validation texts) in source order."""
    texts = []
    for path in data.list_shards(SAMPLE, "en", "validation"):
        with gzip.open(path, "rt") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    os.makedirs(os.path.join(root, "en"), exist_ok=True)
    validation, train = texts[:validation_docs], texts[validation_docs:]
    bounds = np.linspace(0, len(train), shards + 1).astype(int) + np.array([0] + [7] * (shards - 1) + [0])
    pieces = [train[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    layout = [(f"c4-train.{i:05d}-of-{shards:05d}.json.gz", p) for i, p in enumerate(pieces)]
    layout.append(("c4-validation.00000-of-00001.json.gz", validation))
    for name, docs in layout:
        with gzip.open(os.path.join(root, "en", name), "wt") as fh:
            for i, text in enumerate(docs):
                fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://e.com/{i}"}) + "\n")
    return [t for p in pieces for t in p], validation


@pytest.fixture(scope="module")
def c4(tmp_path_factory):
    root = tmp_path_factory.mktemp("c4")
    train, validation = small_c4(root)
    return str(root), train, validation


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(TOKENIZER, 64)


def streaming_rows(files, tokenizer, spec, batch_size=7):
    """The streaming path's rows for these files in source order (no shuffle, one rank, one pass)."""
    stream = data.DocumentStream(files, rank=0, world_size=1, seed=0, buffer_size=1, shuffle=False, repeat=False)
    return torch.cat([b["input_ids"] for b, _ in data.TokenBatches(stream, tokenizer, spec, batch_size)])


def all_rows(directory, split="train"):
    rows = pretokenized.Pretokenized(directory).split(split)
    return torch.from_numpy(rows.read(0, len(rows)).astype(np.int64))


def shard_bytes(directory):
    return {name: open(os.path.join(directory, name), "rb").read()
            for name in sorted(os.listdir(directory)) if name.endswith(".bin")}


def metadata(directory):
    with open(os.path.join(directory, pretokenized.META_FILE)) as fh:
        return json.load(fh)


@pytest.mark.parametrize("packing", [False, True])
def test_rows_equal_the_streaming_rows_for_the_same_documents(tmp_path, c4, tokenizer, packing):
    root, train, _ = c4
    out = pretokenize_dir(tmp_path / "rows", dataset=root, packing=packing)
    spec = data.RowSpec.from_tokenizer(tokenizer, 64, packing)
    stored = all_rows(out)
    streamed = streaming_rows(data.list_shards(root, "en", "train"), tokenizer, spec)
    if packing:  # the stream drops its last partial batch of rows; the carry runs across all four shards
        assert 0 <= len(stored) - len(streamed) < 7 and torch.equal(stored[: len(streamed)], streamed)
        tokens = sum(len(ids) for ids in data.encode_documents(tokenizer, train, spec))
        assert len(stored) == tokens // 64
    else:
        assert torch.equal(stored, streamed) and len(stored) == len(train)
        assert torch.equal(stored, data.pad_rows(data.encode_documents(tokenizer, train, spec), spec))
    meta = metadata(out)
    assert meta["splits"]["train"]["documents"] == len(train) and meta["splits"]["train"]["all_documents"]
    assert [s["rows"] for s in meta["splits"]["train"]["shards"]] == [
        len(np.memmap(os.path.join(out, s["file"]), dtype=np.uint16)) // 64 for s in meta["splits"]["train"]["shards"]]
    assert meta["dtype"] == "uint16" and meta["max_length"] == 64 and meta["packing"] == packing
    assert (meta["pad_id"], meta["eos_id"]) == (0, 1) and meta["tokenizer"] == TOKENIZER


@pytest.mark.slow  # spawning workers that import torch and transformers: ~20 s on 2 busy cores
@pytest.mark.parametrize("packing,workers,max_rows", [(True, 2, 500), (False, 3, None)])
def test_output_is_the_same_for_any_number_of_workers(tmp_path, c4, packing, workers, max_rows):
    root = c4[0]
    one = pretokenize_dir(tmp_path / "one", dataset=root, packing=packing, max_rows=max_rows)
    many = pretokenize_dir(tmp_path / "many", dataset=root, packing=packing, max_rows=max_rows, workers=workers)
    assert shard_bytes(one) == shard_bytes(many) and len(shard_bytes(one)) >= 3
    meta_one, meta_many = metadata(one), metadata(many)
    assert meta_one == meta_many
    if max_rows:
        assert meta_one["splits"]["train"]["rows"] == max_rows and not meta_one["splits"]["train"]["all_documents"]
    assert not [n for n in os.listdir(many) if n.endswith(".tmp")]


@pytest.mark.parametrize("packing", [False, True])
def test_a_row_limit_keeps_the_first_rows(tmp_path, c4, packing):
    root = c4[0]
    whole = all_rows(pretokenize_dir(tmp_path / "whole", dataset=root, packing=packing, splits="train"))
    cut = pretokenize_dir(tmp_path / "cut", dataset=root, packing=packing, splits="train", max_tokens=90 * 64 - 5)
    assert torch.equal(all_rows(cut), whole[:90])
    meta = metadata(cut)["splits"]["train"]
    assert meta["rows"] == 90 and meta["complete"] and meta["max_rows"] == 90


def test_an_interrupted_run_keeps_its_finished_shards_and_ends_identical(tmp_path, c4, capsys):
    root = c4[0]
    straight = pretokenize_dir(tmp_path / "straight", dataset=root, packing=True)

    def interrupt(split, index):
        if split == "train" and index == 1:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    args = pretokenize.build_parser().parse_args(["--dataset", root, "--tokenizer", TOKENIZER, "--out", str(out),
                                                  "--max_length", "64", "--packing"])
    with pytest.raises(KeyboardInterrupt):
        pretokenize.pretokenize(args, on_shard_done=interrupt)
    meta = metadata(out)["splits"]["train"]
    assert not meta["complete"] and [s["file"] for s in meta["shards"]] == ["train-00000.bin", "train-00001.bin"]
    assert sorted(os.listdir(out)) == ["pretokenized.json", "tokenizer", "train-00000.bin", "train-00001.bin"]
    with pytest.raises(UserError, match=r"the train split is incomplete \(the pretokenizer stopped after 2 of 4"):
        pretokenized.open_dataset(str(out))
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("train-00000.bin", "train-00001.bin")}
    capsys.readouterr()
    pretokenize.pretokenize(args)
    assert "train: resuming after 2 finished shard(s)" in capsys.readouterr().out
    assert kept == {n: os.stat(out / n).st_mtime_ns for n in kept}  # not rewritten
    assert shard_bytes(out) == shard_bytes(straight) and metadata(out) == {**metadata(straight), "splits": metadata(out)["splits"]}
    assert metadata(out)["splits"] == metadata(straight)["splits"]


def test_an_existing_directory_with_other_settings_is_refused(tmp_path, c4):
    out = pretokenize_dir(tmp_path / "rows", dataset=c4[0], splits="validation")
    with pytest.raises(UserError, match=r"other settings \(max_length: 64 there, 32 now\)"):
        pretokenize_dir(out, dataset=c4[0], splits="validation", max_length=32)
    with pytest.raises(UserError, match=r"its validation split was made from other shards or another row limit"):
        pretokenize_dir(out, dataset=c4[0], splits="validation", max_rows=10)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"exists and is not empty"):
        pretokenize_dir(tmp_path / "other", dataset=c4[0])


@pytest.mark.parametrize("damage", ["truncated gzip", "bad json"])
def test_a_damaged_source_shard_is_named(tmp_path, c4, damage):
    root = tmp_path / "c4"
    shutil.copytree(c4[0], root)
    shard = root / "en" / "c4-train.00002-of-00004.json.gz"
    if damage == "truncated gzip":
        shard.write_bytes(shard.read_bytes()[:5000])
    else:
        with gzip.open(shard, "wt") as fh:
            fh.write('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=rf"--dataset: reading {shard} failed \((EOFError|ArrowInvalid)"):
        pretokenize_dir(tmp_path / "rows", dataset=str(root), splits="train")


def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, c4):
    for flags, needle in [(["--max_rows", "0"], "must give at least one row"),
                          (["--max_rows", "5", "--max_tokens", "1K"], "not both"),
                          (["--splits", "test"], "a comma-separated subset of train,validation"),
                          (["--workers", "0"], "--workers must be at least 1")]:
        code = pretokenize.main(["--dataset", c4[0], "--tokenizer", TOKENIZER, "--out", str(tmp_path / "x"), *flags])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and needle in err


def test_the_saved_tokenizer_has_the_same_vocabulary_hash(tmp_path, c4, tokenizer):
    out = pretokenize_dir(tmp_path / "rows", dataset=c4[0], splits="validation")
    saved = data.load_tokenizer(os.path.join(out, "tokenizer"), 64)
    assert pretokenized.vocab_hash(saved) == pretokenized.vocab_hash(tokenizer) == metadata(out)["tokenizer_vocab_hash"]
    tokenizer_copy = data.load_tokenizer(TOKENIZER, 64)
    tokenizer_copy.add_special_tokens({"additional_special_tokens": ["<extra_id_0>"]})
    assert pretokenized.vocab_hash(tokenizer_copy) != pretokenized.vocab_hash(tokenizer)


def test_ids_beyond_65535_are_stored_as_uint32():
    class Vocab:
        pad_token_id, eos_token_id = 0, 1

        def __init__(self, size):
            self.size = size

        def get_vocab(self):
            return {f"t{i}": i for i in range(self.size)}

    assert pretokenized.dtype_for(Vocab(65536)) == "uint16"  # ids 0..65535 fit
    assert pretokenized.dtype_for(Vocab(65537)) == "uint32"


# -- reading back: the evaluation set -------------------------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
def test_eval_rows_are_the_first_validation_rows_up_to_the_target(tmp_path, c4, tokenizer, packing):
    root, _, validation = c4
    out = pretokenize_dir(tmp_path / "rows", dataset=root, splits="validation", packing=packing)
    spec = data.RowSpec.from_tokenizer(tokenizer, 64, packing)
    dataset = pretokenized.Pretokenized(out)
    everything, exhausted = pretokenized.build_eval_rows(dataset, spec, target_tokens=10**9)
    assert exhausted and everything.dtype == torch.int64
    expected = streaming_rows(data.list_shards(root, "en", "validation"), tokenizer, spec, batch_size=1)
    if not packing:
        expected = data.pad_rows(data.encode_documents(tokenizer, validation, spec), spec)
    assert torch.equal(everything, expected)  # stored order = source order, rows as the streaming path makes them
    real = (everything != 0).sum(1) if not packing else torch.full((len(everything),), 64)
    target = int(real[:5].sum())
    for chunk_rows in (2, 4096):
        rows, exhausted = pretokenized.build_eval_rows(dataset, spec, target_tokens=target, chunk_rows=chunk_rows)
        assert not exhausted and torch.equal(rows, everything[:5])  # exactly reached at row 5
        rows, _ = pretokenized.build_eval_rows(dataset, spec, target_tokens=target + 1, chunk_rows=chunk_rows)
        assert torch.equal(rows, everything[:6])  # the shortest prefix that reaches the target
    rows, exhausted = pretokenized.build_eval_rows(dataset, spec, target_tokens=int(real.sum()))
    assert not exhausted and len(rows) == len(everything)


# -- reading back: training batches ---------------------------------------------------------------------------
def synthetic_split(rows=50, length=6, shards=(13, 0, 20, 17)):
    """A Split whose row i holds the value i in every position (so a row names itself), in uneven shards."""
    values = np.repeat(np.arange(rows, dtype=np.uint16)[:, None], length, axis=1)
    ends = np.cumsum(shards)
    return pretokenized.Split("train", [values[e - s:e] for s, e in zip(shards, ends)], length)


SPEC = data.RowSpec(max_length=6, pad_id=0, eos_id=1, packing=True, appends_eos=True)


def global_batches(world_size, micro, updates, split=None, state=None, total=12):
    """Per update: the rows every rank trained on, in rank order; and the state after the last update."""
    ranks = [pretokenized.PretokenizedBatches(split or synthetic_split(), SPEC, seed=3, total_batch_size=total,
                                              batch_size=micro, rank=r, world_size=world_size) for r in range(world_size)]
    if state is not None:
        for batches in ranks:
            batches.load_state_dict(state)
    iters = [iter(b) for b in ranks]
    per_update = total // world_size // micro
    out, last = [], None
    for _ in range(updates):
        rows = []
        for it in iters:
            for _ in range(per_update):
                batch, last = next(it)
                assert batch["input_ids"].shape == (micro, 6) and torch.equal(batch["labels"], batch["input_ids"])
                rows += batch["input_ids"][:, 0].tolist()
        out.append(rows)
    return out, last


def test_global_batches_do_not_depend_on_the_world_size_or_the_micro_batch():
    reference, state = global_batches(1, 12, 9)
    for world, micro in [(1, 3), (2, 6), (2, 2), (3, 4), (4, 1)]:
        batches, other = global_batches(world, micro, 9)
        assert batches == reference and other == state
    assert len(set(reference[0])) == 12


def test_an_epoch_uses_each_row_at_most_once_and_the_next_epoch_reshuffles(capsys):
    batches, state = global_batches(1, 4, 9)  # 50 rows, 12 per update: 4 updates per epoch, 2 rows dropped
    first, second = sum(batches[:4], []), sum(batches[4:8], [])
    assert len(set(first)) == 48 and len(set(second)) == 48 and first != second
    assert state == {"kind": "pretokenized", "update": 9, "epoch": 2, "row": 12, "rows": 50}
    out = capsys.readouterr().out
    assert "epoch 0 of the pretokenized train split ends after update 4 (2 of 50 rows left" in out
    assert "epoch 1 starts with update 5" in out and "epoch 2 starts with update 9" in out


def test_a_position_resumes_on_another_world_size():
    reference, _ = global_batches(2, 3, 10)
    _, state = global_batches(2, 3, 6)
    for world in (1, 4):
        tail, _ = global_batches(world, 3, 4, state=state)
        assert tail == reference[6:]


def test_too_few_rows_and_another_split_size_are_refused():
    with pytest.raises(UserError, match=r"has 50 rows, fewer than one global batch \(--total_batch_size 64\)"):
        pretokenized.PretokenizedBatches(synthetic_split(), SPEC, seed=0, total_batch_size=64, batch_size=8, rank=0,
                                         world_size=1)
    batches = pretokenized.PretokenizedBatches(synthetic_split(), SPEC, seed=0, total_batch_size=8, batch_size=8,
                                               rank=0, world_size=1)
    with pytest.raises(UserError, match=r"a pretokenized train split of 60 rows, but --dataset has 50"):
        batches.load_state_dict({"kind": "pretokenized", "update": 1, "epoch": 0, "row": 8, "rows": 60})


def test_rows_are_read_across_shards_in_any_order():
    split = synthetic_split()
    assert len(split) == 50
    picks = np.array([49, 0, 12, 13, 33, 32, 12])
    assert split.take(picks)[:, 0].tolist() == picks.tolist()
    assert split.read(45, 99)[:, 0].tolist() == [45, 46, 47, 48, 49]


def test_training_from_a_pretokenized_directory_defaults_to_its_saved_tokenizer(tmp_path, c4):
    from alphadecay.config import parse_args

    out = pretokenize_dir(tmp_path / "rows", dataset=c4[0], max_rows=8)
    config, _ = parse_args(["--dataset", out, "--model_config", "configs/llama_1m.json"])
    assert config.tokenizer == os.path.join(out, "tokenizer")
    config, _ = parse_args(["--dataset", out, "--tokenizer", TOKENIZER])  # an explicit flag wins
    assert config.tokenizer == TOKENIZER
    config, _ = parse_args(["--dataset", SAMPLE])  # streaming: the usual default
    assert config.tokenizer == "t5-base"
