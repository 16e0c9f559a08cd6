"""Data: C4-layout sources, per-rank split, one pass per epoch, exact resume, rows, hub failures."""

import gzip
import json
import os
import threading
import time
from collections import Counter

import pytest
import torch

from alphadecay import data
from alphadecay.errors import UserError
from tests.conftest import SAMPLE, TOKENIZER, free_port


def write_c4(root, shards=4, docs_per_shard=25, split="train"):
    """A synthetic C4-layout directory whose documents are 'shard S doc I ...'."""
    os.makedirs(os.path.join(root, "en"), exist_ok=True)
    texts = []
    for s in range(shards):
        with gzip.open(os.path.join(root, "en", f"c4-{split}.{s:05d}-of-{shards:05d}.json.gz"), "wt") as fh:
            for i in range(docs_per_shard):
                text = f"shard {s} doc {i} " + "lorem ipsum " * (i % 7)
                texts.append(text)
                fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://e.com/{s}/{i}"}) + "\n")
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(TOKENIZER, 64)


def stream(files, rank=0, world=1, repeat=False, buffer=8, seed=42):
    return data.DocumentStream(files, rank=rank, world_size=world, seed=seed, buffer_size=buffer, repeat=repeat)


def test_local_layout_is_listed_and_wrong_layouts_are_named(tmp_path):
    write_c4(tmp_path)
    write_c4(tmp_path, shards=2, split="validation")
    assert len(data.list_shards(str(tmp_path), "en", "train")) == 4
    assert len(data.list_shards(str(tmp_path), "en", "validation")) == 2
    with pytest.raises(UserError, match=r"no train shards matching realnewslike/c4-train"):
        data.list_shards(str(tmp_path), "realnewslike", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"c4-train\.00000-of-01024\.json\.gz"):
        data.list_shards(str(empty), "en", "train")
    with pytest.raises(UserError, match="no such directory"):
        data.list_shards(str(tmp_path / "missing" / "dir"), "en", "train")


def test_shipped_sample_is_in_c4_layout():
    assert len(data.list_shards(SAMPLE, "en", "train")) >= 2
    assert len(data.list_shards(SAMPLE, "en", "validation")) >= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_split_the_documents_without_overlap_or_loss(tmp_path, world):
    texts = write_c4(tmp_path, shards=4)
    files = data.list_shards(str(tmp_path), "en", "train")
    per_rank = [list(stream(files, rank=r, world=world)) for r in range(world)]
    union = Counter(t for docs in per_rank for t in docs)
    assert union == Counter(texts)  # every document exactly once per epoch, across ranks


def test_epochs_reshuffle_and_each_epoch_uses_every_document_once(tmp_path):
    texts = write_c4(tmp_path, shards=4)
    files = data.list_shards(str(tmp_path), "en", "train")
    it = iter(stream(files, repeat=True))
    first, second = [next(it) for _ in texts], [next(it) for _ in texts]
    assert Counter(first) == Counter(second) == Counter(texts)
    assert first != second


@pytest.mark.parametrize("cut", [0, 3, 30, 99, 100, 130])
def test_document_stream_resumes_exactly(tmp_path, cut):
    write_c4(tmp_path, shards=4)
    files = data.list_shards(str(tmp_path), "en", "train")
    reference = stream(files, repeat=True)
    it = iter(reference)
    head = [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(reference.state_dict()))  # the state must survive serialisation
    tail = [next(it) for _ in range(60)]
    resumed = stream(files, repeat=True)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2) for _ in range(60)] == tail
    assert len(head) == cut


@pytest.mark.parametrize("packing", [False, True])
def test_token_batches_resume_exactly(tmp_path, tokenizer, packing):
    write_c4(tmp_path, shards=4)
    files = data.list_shards(str(tmp_path), "en", "train")
    spec = data.RowSpec.from_tokenizer(tokenizer, 16, packing)
    batches = data.TokenBatches(stream(files, repeat=True), tokenizer, spec, batch_size=3)
    it = iter(batches)
    for _ in range(7):
        _, state = next(it)
    expected = [next(it)[0]["input_ids"] for _ in range(10)]
    resumed = data.TokenBatches(stream(files, repeat=True), tokenizer, spec, batch_size=3)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    for want in expected:
        assert torch.equal(next(it2)[0]["input_ids"], want)


def test_paper_rows_are_one_document_right_padded_with_eos(tokenizer):
    spec = data.RowSpec.from_tokenizer(tokenizer, 12, packing=False)
    assert (spec.pad_id, spec.eos_id, spec.appends_eos) == (0, 1, True)
    short, long = "A short line.", "This sentence is much longer than twelve tokens, so it will be cut to fit the row."
    ids = data.pad_rows(data.encode_documents(tokenizer, [short, long], spec), spec)
    labels = data.labels_for(ids, spec)
    n_short = len(tokenizer(short)["input_ids"])
    assert ids[0, n_short - 1] == 1 and (ids[0, n_short:] == 0).all()
    assert (labels[0, n_short:] == data.IGNORE_INDEX).all() and (labels[0, :n_short] == ids[0, :n_short]).all()
    assert ids[1, -1] == 1 and (ids[1] != 0).all()  # truncated, eos kept as the last token


def test_packed_rows_concatenate_documents_with_eos(tokenizer):
    spec = data.RowSpec.from_tokenizer(tokenizer, 8, packing=True)
    texts = ["first document here", "second one", "and a third document that is a little longer"]
    encoded = data.encode_documents(tokenizer, texts, spec)
    assert all(ids[-1] == 1 for ids in encoded)

    class Fixed:
        def __iter__(self):
            return iter(texts * 10)

        def state_dict(self):
            return {}

    batches = data.TokenBatches(Fixed(), tokenizer, spec, batch_size=2)
    rows = [b["input_ids"] for b, _ in batches]
    flat = torch.cat([r.flatten() for r in rows]).tolist()
    stream_of_tokens = [t for ids in encoded * 10 for t in ids]
    assert flat == stream_of_tokens[: len(flat)]
    assert all((data.labels_for(r, spec) == r).all() for r in rows)


@pytest.mark.parametrize("packing", [False, True])
def test_eval_rows_are_the_split_in_source_order_up_to_the_target(tmp_path, tokenizer, packing):
    texts = write_c4(tmp_path, shards=3, docs_per_shard=20, split="validation")  # in file-name, then file order
    files = data.list_shards(str(tmp_path), "en", "validation")
    spec = data.RowSpec.from_tokenizer(tokenizer, 16, packing=packing)
    encoded = data.encode_documents(tokenizer, texts, spec)
    if packing:
        stream_of_tokens = [t for ids in encoded for t in ids]
        expected = torch.tensor(stream_of_tokens[: len(stream_of_tokens) // 16 * 16]).view(-1, 16)
        real = torch.full((len(expected),), 16)
    else:
        expected = data.pad_rows(encoded, spec)
        real = (expected != spec.pad_id).sum(dim=1)
    target = int(real[:23].sum())  # reached exactly by the first 23 rows
    rows, exhausted = data.build_eval_rows(files, tokenizer, spec, target_tokens=target, docs_per_chunk=7)
    assert not exhausted and rows.dtype == torch.int32 and torch.equal(rows.long(), expected[:23])
    rows, _ = data.build_eval_rows(files, tokenizer, spec, target_tokens=target + 1)  # one more token: one more row
    assert torch.equal(rows.long(), expected[:24])
    rows, exhausted = data.build_eval_rows(files, tokenizer, spec, target_tokens=10**9)
    assert exhausted and torch.equal(rows.long(), expected)


def test_special_tokens_added_beyond_the_vocabulary_by_add_tokens_are_allowed_too():
    tok = data.load_tokenizer(TOKENIZER, 64)
    tok.add_tokens([f"<extra_id_{i}>" for i in range(2)], special_tokens=True)
    data.check_tokenizer_fits(tok, 8000, "t5-like", "configs/llama_1m.json")
    tok.add_tokens(["notspecial"])  # an ordinary added token can appear in text: it must fit
    with pytest.raises(UserError, match="produces token ids up to 8002"):
        data.check_tokenizer_fits(tok, 8000, "t5-like", "configs/llama_1m.json")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:{port}"}])
def test_unreachable_hub_fails_fast_naming_local_alternatives(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value.format(port=free_port()))
    for call in (lambda: data.list_shards("allenai/c4", "en", "train"), lambda: data.load_tokenizer("t5-base", 256)):
        start = time.monotonic()
        with pytest.raises(UserError) as err:
            call()
        assert time.monotonic() - start < 10
        assert "data/c4_sample" in str(err.value) and "data/tokenizer" in str(err.value)


def test_tokenizer_must_fit_the_model_vocabulary(tokenizer):
    data.check_tokenizer_fits(tokenizer, 8000, TOKENIZER, "configs/llama_1m.json")
    with pytest.raises(UserError, match=r"vocab_size 4000.*at least 8000"):
        data.check_tokenizer_fits(tokenizer, 4000, TOKENIZER, "configs/x.json")


def test_sentinel_tokens_beyond_the_vocabulary_are_allowed_but_never_produced():
    """Like t5-base (32,100 ids, 32,000 embeddings): added sentinels are never produced from text."""
    tok = data.load_tokenizer(TOKENIZER, 64)
    tok.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(3)]})
    assert len(tok) == 8003
    data.check_tokenizer_fits(tok, 8000, "t5-like", "configs/llama_1m.json")
    spec = data.RowSpec.from_tokenizer(tok, 64, packing=False)
    ids = data.encode_documents(tok, ["a literal <extra_id_0> in the text"], spec)[0]
    assert max(ids) < 8000


def batches_and_states(n=3):
    for i in range(n):
        yield {"input_ids": torch.full((2, 4), i), "labels": torch.full((2, 4), -i)}, {"rows": i}


def test_the_prefetcher_pins_the_tensors_for_a_cuda_device_only(monkeypatch):
    """CPU: the source's items unchanged. CUDA: every tensor of every item goes through pin_memory (checked for real
    in tests/test_gpu.py; CPU-only torch cannot pin, so pin_memory is replaced by a recording clone here)."""
    cpu = data.Prefetcher(batches_and_states(), device=torch.device("cpu"))
    assert not cpu.pin_memory and not data.Prefetcher(iter(()), device=None).pin_memory
    assert [s for _, s in cpu] == [{"rows": 0}, {"rows": 1}, {"rows": 2}]
    pinned = []

    def pin_memory(tensor):
        pinned.append(tensor.clone())
        return pinned[-1]

    current = []  # the producer thread's GPU: the run's, not GPU 0
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append((device, threading.get_ident())))
    gpu = data.Prefetcher(batches_and_states(), device=torch.device("cuda", 1))
    got = list(gpu)
    assert current == [(torch.device("cuda", 1), gpu._thread.ident)]
    assert gpu.pin_memory and len(pinned) == 6
    assert all(b["input_ids"] is pinned[2 * i] and b["labels"] is pinned[2 * i + 1] for i, (b, _) in enumerate(got))
    expected = list(batches_and_states())
    assert all(torch.equal(b["input_ids"], e["input_ids"]) and torch.equal(b["labels"], e["labels"]) and s == es
               for (b, s), (e, es) in zip(got, expected))
