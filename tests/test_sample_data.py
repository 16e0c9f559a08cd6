"""The shipped C4-layout sample (`data/c4_sample`), its tokenizer (`data/tokenizer`) and the pure helpers of
`scripts/build_c4_sample.py` that made them. CPU only, no network, a few seconds."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "c4_sample"
TOKENIZER = ROOT / "data" / "tokenizer"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_c4_sample", ROOT / "scripts" / "build_c4_sample.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


build = load_build_script()


def shards(split: str) -> list[Path]:
    return sorted(SAMPLE.glob(f"en/c4-{split}.*-of-*.json.gz"))


def records(paths: list[Path]) -> Iterator[dict]:
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return list(records(shards("train")))


@pytest.fixture(scope="module")
def validation() -> list[dict]:
    return list(records(shards("validation")))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


# ------------------------------------------------------------------------------------------------------------
# The sample
# ------------------------------------------------------------------------------------------------------------
def test_layout_matches_c4_file_names():
    train_files, validation_files = shards("train"), shards("validation")
    assert [p.name for p in train_files] == [f"c4-train.{i:05d}-of-00008.json.gz" for i in range(8)]
    assert [p.name for p in validation_files] == [f"c4-validation.{i:05d}-of-00002.json.gz" for i in range(2)]
    assert sorted(p.name for p in (SAMPLE / "en").iterdir()) == sorted(p.name for p in train_files + validation_files)
    assert (SAMPLE / "README.md").is_file()
    sizes = [p.stat().st_size for p in train_files]
    assert max(sizes) < 1.2 * min(sizes), "train shards should be of similar size"
    total = sum(p.stat().st_size for p in train_files + validation_files)
    assert 1.5e6 < total < 6e6


def test_every_line_is_a_c4_record(train, validation):
    for record in train + validation:
        assert list(record) == ["text", "timestamp", "url"]
        assert isinstance(record["text"], str) and record["text"].strip()
        assert TIMESTAMP.match(record["timestamp"])
        assert record["url"].startswith("https://")
    for path in shards("train") + shards("validation"):
        raw = gzip.decompress(path.read_bytes()).decode("utf-8")
        assert raw.endswith("\n") and "\n\n" not in raw  # one JSON object per line, no blank lines


def test_documents_look_like_c4_documents(train, validation):
    lengths = sorted(len(r["text"]) for r in train + validation)
    assert lengths[0] >= 300 and lengths[len(lengths) // 2] > 800
    assert lengths[-1] < 10_000
    assert len(validation) / (len(train) + len(validation)) == pytest.approx(0.05, abs=0.01)
    for record in train[:200]:
        for line in record["text"].split("\n"):
            assert line == line.strip() and line.endswith(build.TERMINAL_PUNCTUATION)
            assert "{" not in line and "\u00b6" not in line


def test_train_and_validation_share_no_document(train, validation):
    train_texts = {r["text"] for r in train}
    validation_texts = {r["text"] for r in validation}
    assert len(train_texts) == len(train) and len(validation_texts) == len(validation)
    assert not train_texts & validation_texts


def test_sample_streams_with_datasets():
    from datasets import load_dataset

    data_files = {"train": [str(p) for p in shards("train")], "validation": [str(p) for p in shards("validation")]}
    for split in ("train", "validation"):
        stream = load_dataset("json", data_files=data_files, split=split, streaming=True)
        first = [row for _, row in zip(range(3), stream)]
        assert len(first) == 3
        assert all(set(row) == {"text", "timestamp", "url"} and row["text"] for row in first)


# ------------------------------------------------------------------------------------------------------------
# The tokenizer
# ------------------------------------------------------------------------------------------------------------
def test_tokenizer_ids_and_size(tokenizer):
    assert tokenizer.is_fast
    assert len(tokenizer) == 8000 and tokenizer.vocab_size == 8000
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    assert tokenizer.bos_token_id is None
    assert max(tokenizer.get_vocab().values()) == 7999


def test_tokenizer_appends_eos_keeps_it_under_truncation_and_pads_right(tokenizer):
    ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    assert ids[-1] == 1 and 1 not in ids[:-1] and 2 not in ids
    truncated = tokenizer("word " * 100, truncation=True, max_length=10)["input_ids"]
    assert len(truncated) == 10 and truncated[-1] == 1
    padded = tokenizer("The quick brown fox jumps over the lazy dog.", padding="max_length", max_length=32)
    assert padded["input_ids"] == ids + [0] * (32 - len(ids))
    assert padded["attention_mask"] == [1] * len(ids) + [0] * (32 - len(ids))
    batch = tokenizer(["A short one.", "A somewhat longer sentence than the first one."], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["input_ids"][1][-1] == 1


def test_tokenizer_round_trips_validation_sentences(tokenizer, validation):
    sentences = [line for record in validation[:40] for line in record["text"].split("\n")][:25]
    assert len(sentences) == 25
    for sentence in sentences:
        encoded = tokenizer(sentence)["input_ids"]
        assert encoded[-1] == 1
        if 2 not in encoded:
            assert tokenizer.decode(encoded, skip_special_tokens=True) == " ".join(sentence.split())
    text = "Hello,   world!\nThis is a   test."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == "Hello, world! This is a test."


def test_tokenizer_unk_rate_on_validation_is_low(tokenizer, validation):
    encoded = tokenizer([r["text"] for r in validation], add_special_tokens=False)["input_ids"]
    tokens = sum(len(ids) for ids in encoded)
    unknown = sum(ids.count(2) for ids in encoded)
    assert tokens > 50_000
    assert unknown / tokens < 0.005
    chars = sum(len(r["text"]) for r in validation)
    assert 3.0 < chars / tokens < 6.0  # a real 8k vocabulary, not a character-level or degenerate one


def test_tokenizer_json_matches_spiece_model(tokenizer, validation):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER / "spiece.model"))
    assert sp.get_piece_size() == 8000
    vocab = tokenizer.get_vocab()
    assert all(vocab[sp.id_to_piece(i)] == i for i in range(8000))
    for record in validation[:10]:
        assert tokenizer(record["text"], add_special_tokens=False)["input_ids"] == sp.encode(record["text"])


# ------------------------------------------------------------------------------------------------------------
# The build script's pure helpers, on tiny synthetic inputs
# ------------------------------------------------------------------------------------------------------------
SYNTHETIC_HTML = """<html><head><title>T</title><script>var x = 1;</script></head><body>
<div class="sphinxsidebar"><p>Navigation links that should never appear in the output text.</p></div>
<div class="body" role="main">
<section id="intro"><h1>Intro<a class="headerlink" href="#intro">\u00b6</a></h1>
<p>This is the first paragraph of running prose,
wrapped over two lines in the source.</p>
<div class="highlight"><pre>def f(x):
    return {x: 1}</pre></div>
<p>For example:</p>
<table><tr><td>A table cell that has enough words to pass.</td></tr></table>
<ul><li><p>A list item that is a complete sentence on its own.</p></li></ul>
<p>Short one.</p>
</section>
<section id="details"><h2>Details</h2>
<p>A dictionary is written as {key: value} in this paragraph, which is dropped.</p>
<p>The second section starts here and has a sentence of its own.</p>
</section></div>
<div class="footer"><p>Copyright notice in the footer, which is also dropped.</p></div>
</body></html>"""


def test_html_to_blocks_keeps_prose_and_drops_code_tables_and_navigation():
    blocks = build.html_to_blocks(SYNTHETIC_HTML, ("role", "main"))
    texts = [b.text for b in blocks if not b.heading]
    assert "This is the first paragraph of running prose, wrapped over two lines in the source." in texts
    assert "A list item that is a complete sentence on its own." in texts
    joined = " ".join(texts)
    for dropped in ("var x", "Navigation", "return", "table cell", "Copyright", "\u00b6"):
        assert dropped not in joined
    assert [b.text for b in blocks if b.heading] == ["Intro", "Details"]
    anchors = {b.text: b.anchor for b in blocks}
    assert anchors["The second section starts here and has a sentence of its own."] == "details"
    with pytest.raises(build.BuildError):
        build.html_to_blocks("<p>no main element here at all.</p>", ("role", "main"))


def test_html_to_blocks_handles_unclosed_paragraphs():
    blocks = build.html_to_blocks("<p>First paragraph without a close tag.<p>Second one.<li>Third.<br>Fourth.")
    assert [b.text for b in blocks] == ["First paragraph without a close tag.", "Second one.", "Third.", "Fourth."]


def test_clean_paragraph_applies_c4_line_filters():
    assert build.clean_paragraph("  A  sentence\nwith five words.  ") == "A sentence with five words."
    assert build.clean_paragraph("He said, \u201cit works fine for me.\u201d") is not None
    assert build.clean_paragraph("Too short to keep.") is None  # 4 words
    assert build.clean_paragraph("This line has no terminal punctuation") is None
    assert build.clean_paragraph("For example, the following code does this:") is None
    assert build.clean_paragraph("Enable JavaScript in your browser to see this.") is None
    assert build.clean_paragraph("A literal {1: 2} is a dictionary display.") is None


def test_pack_documents_respects_sizes_and_sections():
    paragraph = "This is one sentence. This is another sentence. "  # 49 characters, 2 sentences
    section = [((paragraph * 4).strip(), f"a{i}") for i in range(10)]  # ~195 characters each
    documents = build.pack_documents([section], min_chars=400, max_chars=1000)
    assert all(400 <= len(text) <= 1000 for text, _ in documents)
    assert documents[0][1] == "a0" and all(text.count("\n") >= 1 for text, _ in documents)
    assert "\n".join(text for text, _ in documents) == "\n".join(p for p, _ in section)  # nothing lost here
    # A short section joins the next one; a too-short remainder is dropped.
    small = [("Tiny section text. It is short. Really.", "s")]
    documents = build.pack_documents([small, section[:3]], min_chars=400, max_chars=1000)
    assert len(documents) == 1 and documents[0][0].startswith("Tiny") and documents[0][1] == "s"
    assert build.pack_documents([small], min_chars=400, max_chars=1000) == []


def test_blocks_to_sections_deduplicates_paragraphs():
    block = build.Block("The same paragraph appears twice on the page.", "x")
    seen: set[str] = set()
    sections = build.blocks_to_sections([block, build.Block("H", None, heading=True), block], seen)
    assert sections == [[("The same paragraph appears twice on the page.", "x")]]
    assert build.blocks_to_sections([block], seen) == []  # already used elsewhere in the sample


def test_kjv_documents_from_listing():
    verses = [f"Ge1:{i} And it came to pass that verse number {i} was spoken unto them" + (";" if i % 3 else ".")
              for i in range(1, 61)]
    verses += ["Exo2:1 And there went a man of the house of Levi, and took to wife a daughter of Levi.", ""]
    documents = build.kjv_documents(verses, "2022-09-30T14:22:50Z", set())
    assert [d.url for d in documents] == [f"https://bible-kjv-text.invalid/Genesis/1?part={i}" for i in (1, 2)]
    assert all("Ge1:" not in d.text and d.timestamp == "2022-09-30T14:22:50Z" for d in documents)
    assert all(line.endswith(".") for d in documents for line in d.text.split("\n"))  # never ends on a ';' 
    assert not any("Exodus" in d.url for d in documents)  # one short verse: below the minimum size
    with pytest.raises(build.BuildError):
        build.kjv_documents(["Xyz1:1 Not a book."], "t", set())


def test_split_and_shard_is_deterministic_and_disjoint():
    import random

    documents = [build.Document(f"Document number {i}. " * (i % 7 + 1), "2019-04-25T12:57:54Z", f"https://x/{i}")
                 for i in range(200)]
    documents.append(documents[5])  # an exact duplicate is kept once
    train_a, valid_a = build.split_and_shard(documents, 1, 0.05, 8, 2)
    shuffled = list(documents)
    random.Random(0).shuffle(shuffled)
    train_b, valid_b = build.split_and_shard(shuffled, 1, 0.05, 8, 2)
    assert (train_a, valid_a) == (train_b, valid_b)  # independent of input order
    assert len(train_a) == 8 and len(valid_a) == 2
    train_texts = [d.text for shard in train_a for d in shard]
    valid_texts = [d.text for shard in valid_a for d in shard]
    assert len(valid_texts) == 10 and len(train_texts) + len(valid_texts) == 200
    assert not set(train_texts) & set(valid_texts)
    assert max(map(len, train_a)) - min(map(len, train_a)) <= 1
    assert build.split_and_shard(documents, 2, 0.05, 8, 2) != (train_a, valid_a)  # the seed matters


def test_shard_bytes_are_reproducible_c4_json_lines():
    documents = [build.Document("Caf\u00e9 \u201cquoted\u201d text.\nSecond line.", "2019-04-25T12:57:54Z",
                                "https://example.org/a")]
    first, second = build.shard_bytes(documents), build.shard_bytes(documents)
    assert first == second and first[4:8] == b"\0\0\0\0"  # gzip mtime field is zero
    line = gzip.decompress(first).decode("utf-8")
    assert line == ('{"text":"Caf\u00e9 \u201cquoted\u201d text.\\nSecond line.","timestamp":"2019-04-25T12:57:54Z",'
                    '"url":"https://example.org/a"}\n')
    assert build.shard_name("train", 3, 8) == "c4-train.00003-of-00008.json.gz"


def test_protobuf_reader_finds_the_charsmap():
    # ModelProto{ pieces(1): "..", normalizer_spec(3): { name(1): "n", precompiled_charsmap(2): b"\x01\x02" } }
    normalizer = b"\x0a\x01n" + b"\x12\x02\x01\x02"
    message = b"\x0a\x02ab" + b"\x1a" + bytes([len(normalizer)]) + normalizer + b"\x20\x96\x01"
    assert build.precompiled_charsmap(message) == b"\x01\x02"
    fields = list(build.read_protobuf_fields(message))
    assert fields[-1] == (4, 0, 150)  # a two-byte varint
    shipped = (TOKENIZER / "spiece.model").read_bytes()
    charsmap = build.precompiled_charsmap(shipped)
    normalizer_json = json.loads((TOKENIZER / "tokenizer.json").read_text())["normalizer"]
    import base64

    assert base64.b64decode(normalizer_json["normalizers"][0]["precompiled_charsmap"]) == charsmap
