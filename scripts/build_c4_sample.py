#!/usr/bin/env python3
"""Rebuild the offline C4-layout sample (`data/c4_sample`) and its SentencePiece tokenizer (`data/tokenizer`).

The hub (allenai/c4, t5-base) is not reachable everywhere this project runs, so the repository ships a few MB of
real English prose in C4's own on-disk layout plus an 8,000-id T5-style tokenizer trained on it. This script
rebuilds both from Debian packages, which any Debian/Ubuntu machine can fetch with `apt-get download`:

  * python3.11-doc   the Python 3.11 documentation (HTML)          PSF License
  * sqlite3-doc      the SQLite documentation (HTML)                public domain
  * bible-kjv-text   the King James Bible (compressed text), read   public domain (the KJV text)
    with the `bible` program of bible-kjv (+ its libreadline8)

Run (from the repository root, on Debian 12 "bookworm" or with those package versions reachable through apt):

    .venv/bin/python scripts/build_c4_sample.py --out data/c4_sample --tokenizer_out data/tokenizer

Options: `--debs_dir DIR` uses .deb files already in DIR instead of downloading; `--any_version` accepts
whatever versions apt offers (the output then differs from the shipped files); `--keep_work_dir DIR` keeps the
downloads and extracted trees there. The output is deterministic: the same package versions give byte-identical
shards, tokenizer and READMEs (gzip with mtime 0, fixed seeds, sorted inputs, single-threaded SentencePiece).

Pipeline: HTML -> prose paragraphs (html.parser; code blocks, tables, navigation, scripts dropped) -> C4's own
line filters (a kept line ends in terminal punctuation, has at least 5 words, no "javascript", no curly
bracket) -> exact-paragraph deduplication -> documents of a few hundred to a few thousand characters (split at
section/paragraph boundaries) -> per-source character budget -> deterministic shuffle -> 5% validation ->
round-robin shards -> SentencePiece unigram (8,000 ids, pad 0 / eos 1 / unk 2, no bos) on the train split ->
a `tokenizers` tokenizer.json built from the SentencePiece pieces, scores and normalizer -> every tokenizer
property the training code relies on is checked, and the build fails loudly if one does not hold.
"""

from __future__ import annotations

import argparse
import email.utils
import gzip
import hashlib
import html.parser
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timezone
from pathlib import Path

# ------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------
# Exact versions the shipped files were built from (Debian 12 "bookworm", main). `--any_version` lifts the pin.
PINNED_PACKAGES: dict[str, str] = {
    "python3.11-doc": "3.11.2-6+deb12u8",
    "sqlite3-doc": "3.40.1-2+deb12u2",
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",  # the `bible` program that decompresses bible-kjv-text's data file
    "libreadline8": "8.2-1.3",  # the `bible` program's one non-essential shared library
}

PYTHON_DOC_ROOT = "usr/share/doc/python3.11/html"
SQLITE_DOC_ROOT = "usr/share/doc/sqlite3"
KJV_DATA_DIR = "usr/lib"  # bible.data and bible.data.conc
KJV_PROGRAM = "usr/bin/bible"

# Pages that are indexes, tables of contents or change logs rather than prose.
PYTHON_EXCLUDE = re.compile(r"^(_sources|_static|_downloads|_images)/|^(genindex.*|py-modindex|search|contents)\.html$"
                            r"|^whatsnew/changelog\.html$")
SQLITE_EXCLUDE = re.compile(r"^(releaselog|images)/|^(changes|chronology|sitemap|keyword_index|doclist|toc)\.html$")

# Characters of document text taken from each source at most (after shuffling its documents), which keeps the
# archaic KJV from dominating the technical documentation and the whole sample at "a few MB" compressed.
SOURCE_CHAR_BUDGET: dict[str, int] = {"python": 6_000_000, "sqlite": 2_000_000, "kjv": 1_600_000}

# The 66 books in the order the `bible` program prints them, with the abbreviations it prints.
KJV_BOOKS: dict[str, str] = dict(zip(
    "Ge Exo Lev Num Deu Josh Jdgs Ruth 1Sm 2Sm 1Ki 2Ki 1Chr 2Chr Ezra Neh Est Job Psa Prv Eccl SSol Isa Jer Lam "
    "Eze Dan Hos Joel Amos Obad Jonah Mic Nahum Hab Zep Hag Zec Mal Mat Mark Luke John Acts Rom 1Cor 2Cor Gal Eph "
    "Phi Col 1Th 2Th 1Tim 2Tim Titus Phmn Heb Jas 1Pet 2Pet 1Jn 2Jn 3Jn Jude Rev".split(),
    "Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1-Samuel 2-Samuel 1-Kings 2-Kings "
    "1-Chronicles 2-Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song-of-Solomon Isaiah "
    "Jeremiah Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai "
    "Zechariah Malachi Matthew Mark Luke John Acts Romans 1-Corinthians 2-Corinthians Galatians Ephesians "
    "Philippians Colossians 1-Thessalonians 2-Thessalonians 1-Timothy 2-Timothy Titus Philemon Hebrews James "
    "1-Peter 2-Peter 1-John 2-John 3-John Jude Revelation".split(), strict=True))
KJV_URL = "https://bible-kjv-text.invalid/{book}/{chapter}"  # no canonical page exists: a reserved-TLD pseudo-URL

# Document shape (characters). Paragraphs are packed into documents up to MAX_DOC_CHARS; a document ends early at
# a section boundary once it has MIN_DOC_CHARS; shorter leftovers are dropped. A single paragraph longer than
# MAX_DOC_CHARS is kept whole as its own document.
MIN_DOC_CHARS = 400
MAX_DOC_CHARS = 3000
MIN_DOC_SENTENCES = 3  # C4 drops pages with fewer than 3 sentences
KJV_PARAGRAPH_CHARS = 400  # verses are joined into paragraphs of about this many characters

SEED = 20190425  # the date of C4's Common Crawl snapshot, as a fixed seed
VALIDATION_FRACTION = 0.05
NUM_TRAIN_SHARDS = 8
NUM_VALIDATION_SHARDS = 2

VOCAB_SIZE = 8000
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
MODEL_MAX_LENGTH = 512  # as t5-base; the training code passes its own --max_length anyway
MAX_VALIDATION_UNK_RATE = 0.005


class BuildError(RuntimeError):
    """A precondition or a check failed; the message says what and how to fix it."""


@dataclass(frozen=True)
class Document:
    """One C4 record. Field order is the JSON key order: text, timestamp, url."""

    text: str
    timestamp: str
    url: str

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "timestamp": self.timestamp, "url": self.url},
                          ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class Block:
    """A run of text between block-level tags: a heading (a section boundary) or a paragraph."""

    text: str
    anchor: str | None  # the nearest fragment id at or before the block, for the document's URL
    heading: bool = False


# ------------------------------------------------------------------------------------------------------------
# HTML -> blocks
# ------------------------------------------------------------------------------------------------------------
BLOCK_TAGS = frozenset("address article aside blockquote body br caption dd div dl dt figcaption figure footer "
                       "h1 h2 h3 h4 h5 h6 header hr li main nav ol p section td th tr ul".split())
HEADING_TAGS = frozenset("h1 h2 h3 h4 h5 h6".split())
# Elements whose whole content is dropped. All are reliably closed in both documentation sets (unlike <p>, <li>
# and <dt> in SQLite's hand-written HTML), so a depth count of the same tag finds their end.
SKIP_TAGS = frozenset("script style head pre table form select textarea noscript svg math".split())
SKIP_CLASSES = frozenset([
    "highlight", "sphinxsidebar", "related", "footer", "toctree-wrapper", "headerlink", "admonition-title",
    "nosearch", "rightsidebar", "menu", "searchmenu", "tagline", "fancy_toc", "codeblock", "imgcontainer",
])


class ProseExtractor(html.parser.HTMLParser):
    """Collects the text of block-level elements as `Block`s, dropping code, tables and navigation.

    With `root_attr=("role", "main")` only the content of the element carrying that attribute is read (Sphinx's
    main body), which leaves out the sidebars, header and footer wholesale.
    """

    def __init__(self, root_attr: tuple[str, str] | None = None) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._root_attr = root_attr
        self._root_tag: str | None = None  # set while inside the root element
        self._root_depth = 0
        self._seen_root = root_attr is None
        self._skip_tag: str | None = None  # set while inside a dropped element
        self._skip_depth = 0
        self._buffer: list[str] = []
        self._anchor: str | None = None
        self._block_anchor: str | None = None
        self._in_heading = False

    @property
    def _reading(self) -> bool:
        inside_root = self._root_attr is None or self._root_tag is not None
        return inside_root and self._skip_tag is None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if self._skip_tag is not None:
            self._skip_depth += tag == self._skip_tag
            return
        if self._root_tag is not None:
            self._root_depth += tag == self._root_tag
        elif self._root_attr is not None and values.get(self._root_attr[0]) == self._root_attr[1]:
            self._root_tag, self._root_depth, self._seen_root = tag, 1, True
            return
        if not self._reading:
            return
        if tag in SKIP_TAGS or SKIP_CLASSES.intersection(values.get("class", "").split()):
            self._flush()
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in BLOCK_TAGS:
            self._flush()
        if tag in HEADING_TAGS:
            self._in_heading = True
        anchor = values.get("id") or (values.get("name") if tag == "a" else None)
        if anchor and not anchor.startswith("index-"):  # Sphinx's "index-N" targets are not section names
            self._anchor = anchor

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # `<br/>` and friends: a void element never opens a skipped or root element.
        if self._reading and tag in BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if self._root_tag is not None and tag == self._root_tag:
            self._root_depth -= 1
            if self._root_depth == 0:
                self._flush()
                self._root_tag = None
                return
        if self._reading and (tag in BLOCK_TAGS or tag in HEADING_TAGS):
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._reading:
            if not self._buffer:
                self._block_anchor = self._anchor
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()
        if not self._seen_root:
            raise BuildError(f"no element with {self._root_attr} found: has the documentation's HTML layout changed?")

    def _flush(self) -> None:
        text = normalize_space("".join(self._buffer))
        self._buffer = []
        if text:
            self.blocks.append(Block(text, self._block_anchor, heading=self._in_heading))
        elif self._in_heading:
            self.blocks.append(Block("", self._block_anchor, heading=True))
        self._in_heading = False


def html_to_blocks(html_text: str, root_attr: tuple[str, str] | None = None) -> list[Block]:
    parser = ProseExtractor(root_attr)
    parser.feed(html_text)
    parser.close()
    return parser.blocks


# ------------------------------------------------------------------------------------------------------------
# Cleaning (C4's line filters) and documents
# ------------------------------------------------------------------------------------------------------------
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "\u201d", "'", "\u2019")  # C4: period, !, ?, or an end quotation mark
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)")


def normalize_space(text: str) -> str:
    """Collapse every run of whitespace (including no-break spaces and newlines) to one space."""
    return " ".join(text.split())


def clean_paragraph(text: str) -> str | None:
    """The paragraph with normalised whitespace if C4 would keep it as a line, else None.

    C4 keeps a line only when it ends in terminal punctuation, has at least 5 words and does not contain
    "javascript"; it drops whole pages with a curly bracket (code), which we apply per paragraph. A pilcrow (the
    Sphinx permalink sign, should one slip through) is removed.
    """
    text = normalize_space(text.replace("\u00b6", ""))
    if not text.endswith(TERMINAL_PUNCTUATION) or len(text.split()) < 5:
        return None
    if "{" in text or "}" in text or "javascript" in text.lower() or "lorem ipsum" in text.lower():
        return None
    return text


def count_sentences(text: str) -> int:
    return len(SENTENCE_END.findall(text))


def pack_documents(sections: Sequence[Sequence[tuple[str, str | None]]],
                   min_chars: int = MIN_DOC_CHARS, max_chars: int = MAX_DOC_CHARS,
                   min_sentences: int = MIN_DOC_SENTENCES) -> list[tuple[str, str | None]]:
    """Pack the (paragraph, anchor) lists of one page's sections into (text, anchor-of-first-paragraph) documents.

    Paragraphs are joined with newlines (as in C4). A document is closed when the next paragraph would take it
    past `max_chars`, or at a section boundary once it has `min_chars`; a short section thus joins the next one.
    Documents shorter than `min_chars` or with fewer than `min_sentences` sentences are dropped.
    """
    documents: list[tuple[str, str | None]] = []
    current: list[str] = []
    anchor: str | None = None
    size = 0

    def close() -> None:
        nonlocal current, anchor, size
        text = "\n".join(current)
        if size >= min_chars and count_sentences(text) >= min_sentences:
            documents.append((text, anchor))
        current, anchor, size = [], None, 0

    for section in sections:
        for paragraph, paragraph_anchor in section:
            if current and size + 1 + len(paragraph) > max_chars:
                close()
            if not current:
                anchor = paragraph_anchor
            current.append(paragraph)
            size += len(paragraph) + (1 if size else 0)
        if size >= min_chars:
            close()
    close()
    return documents


def blocks_to_sections(blocks: Iterable[Block], seen: set[str]) -> list[list[tuple[str, str | None]]]:
    """Split blocks into sections at headings, keeping the paragraphs that pass `clean_paragraph`.

    `seen` holds the hashes of paragraphs already used anywhere in the sample (exact-paragraph deduplication,
    a simpler cousin of C4's three-sentence-span deduplication); it is updated in place.
    """
    sections: list[list[tuple[str, str | None]]] = [[]]
    for block in blocks:
        if block.heading:
            if sections[-1]:
                sections.append([])
            continue
        paragraph = clean_paragraph(block.text)
        if paragraph is None:
            continue
        key = hashlib.sha1(paragraph.lower().encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        sections[-1].append((paragraph, block.anchor))
    return [section for section in sections if section]


def html_documents(pages: Iterable[tuple[str, str]], base_url: str, timestamp: str, seen: set[str],
                   root_attr: tuple[str, str] | None = None) -> list[Document]:
    """Documents from (relative path, HTML) pages; URLs are `base_url + path + #anchor`."""
    documents = []
    for relpath, html_text in pages:
        sections = blocks_to_sections(html_to_blocks(html_text, root_attr), seen)
        for text, anchor in pack_documents(sections):
            url = base_url + relpath + (f"#{anchor}" if anchor else "")
            documents.append(Document(text, timestamp, url))
    return documents


KJV_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.+)$")


def kjv_documents(lines: Iterable[str], timestamp: str, seen: set[str]) -> list[Document]:
    """One document per chapter (long chapters in parts) from the `bible -f` listing, one verse per line.

    Verse numbers are dropped and consecutive verses are joined into paragraphs of about KJV_PARAGRAPH_CHARS
    that end at a sentence end.
    """
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        match = KJV_LINE.match(line.strip())
        if match is None:
            if line.strip():
                raise BuildError(f"unexpected line in the bible listing: {line!r}")
            continue
        book, chapter, _verse, text = match.groups()
        if book not in KJV_BOOKS:
            raise BuildError(f"unknown book abbreviation {book!r} in the bible listing")
        chapters.setdefault((book, int(chapter)), []).append(normalize_space(text))
    documents = []
    for (book, chapter), verses in chapters.items():  # insertion order = the Bible's order
        # A paragraph ends only after a verse that ends a sentence (verses often end in ',', ';' or ':').
        paragraphs: list[str] = []
        current: list[str] = []
        for verse in verses:
            current.append(verse)
            if sum(len(v) + 1 for v in current) >= KJV_PARAGRAPH_CHARS and verse.endswith((".", "?", "!")):
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        section = []
        for paragraph in paragraphs:
            cleaned = clean_paragraph(paragraph)  # the same C4 line filters as the HTML sources
            if cleaned is None:
                continue
            key = hashlib.sha1(cleaned.lower().encode()).hexdigest()
            if key not in seen:  # a few passages repeat verbatim (e.g. Psalms 14 and 53)
                seen.add(key)
                section.append((cleaned, None))
        url = KJV_URL.format(book=KJV_BOOKS[book], chapter=chapter)
        parts = pack_documents([section])
        for part, (text, _) in enumerate(parts, start=1):
            documents.append(Document(text, timestamp, url if len(parts) == 1 else f"{url}?part={part}"))
    return documents


# ------------------------------------------------------------------------------------------------------------
# Selection, split and shards
# ------------------------------------------------------------------------------------------------------------
def take_budget(documents: Sequence[Document], budget_chars: int, seed: int) -> list[Document]:
    """A deterministic random subset of at most `budget_chars` characters of text (in shuffled order)."""
    order = list(documents)
    random.Random(seed).shuffle(order)
    taken, total = [], 0
    for document in order:
        if total + len(document.text) > budget_chars:
            continue
        taken.append(document)
        total += len(document.text)
    return taken


def split_and_shard(documents: Sequence[Document], seed: int, validation_fraction: float,
                    num_train_shards: int, num_validation_shards: int,
                    ) -> tuple[list[list[Document]], list[list[Document]]]:
    """Shuffle, cut off the validation documents and deal each split round-robin into its shards.

    The input is first sorted (by url, then text), so the result depends only on the set of documents and the
    seed. A text that occurs twice can only land in one split, because duplicates are removed first.
    """
    unique = sorted({(d.url, d.text): d for d in documents}.values(), key=lambda d: (d.url, d.text))
    seen_texts: set[str] = set()
    deduplicated = []
    for document in unique:
        if document.text not in seen_texts:
            seen_texts.add(document.text)
            deduplicated.append(document)
    random.Random(seed).shuffle(deduplicated)
    num_validation = max(num_validation_shards, round(len(deduplicated) * validation_fraction))
    if len(deduplicated) - num_validation < num_train_shards:
        raise BuildError(f"only {len(deduplicated)} documents: too few for {num_train_shards} train and "
                         f"{num_validation_shards} validation shards")
    validation, train = deduplicated[:num_validation], deduplicated[num_validation:]
    train_shards = [train[i::num_train_shards] for i in range(num_train_shards)]
    validation_shards = [validation[i::num_validation_shards] for i in range(num_validation_shards)]
    return train_shards, validation_shards


def shard_name(split: str, index: int, count: int) -> str:
    return f"c4-{split}.{index:05d}-of-{count:05d}.json.gz"


def gzip_bytes(payload: bytes) -> bytes:
    """gzip with a zero mtime and no file name in the header, so equal input gives equal bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(payload)
    return buffer.getvalue()


def shard_bytes(documents: Sequence[Document]) -> bytes:
    return gzip_bytes("".join(d.to_json() + "\n" for d in documents).encode("utf-8"))


# ------------------------------------------------------------------------------------------------------------
# Fetching the packages
# ------------------------------------------------------------------------------------------------------------
def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"`{name}` not found on PATH. {hint}")
    return path


def fetch_packages(work_dir: Path, debs_dir: Path | None, any_version: bool) -> tuple[dict[str, Path], dict[str, str]]:
    """Download (or find in `debs_dir`) each package's .deb and extract it.

    Returns package -> extracted root, and package -> version (from the .deb's name).
    """
    dpkg_deb = require_tool("dpkg-deb", "This build needs Debian's dpkg-deb (package `dpkg`) to unpack .deb files.")
    download_dir = work_dir / "debs"
    download_dir.mkdir(parents=True, exist_ok=True)
    roots: dict[str, Path] = {}
    versions: dict[str, str] = {}
    for package, version in PINNED_PACKAGES.items():
        deb = find_deb(debs_dir, package, None if any_version else version) if debs_dir else None
        if deb is None:
            apt_get = require_tool("apt-get", "Fetch the .deb files on a Debian/Ubuntu machine (apt-get download "
                                   + " ".join(f"{p}={v}" for p, v in PINNED_PACKAGES.items())
                                   + ") and pass their folder with --debs_dir.")
            spec = package if any_version else f"{package}={version}"
            result = subprocess.run([apt_get, "download", spec], cwd=download_dir, capture_output=True, text=True)
            deb = find_deb(download_dir, package, None if any_version else version)
            if result.returncode != 0 or deb is None:
                raise BuildError(f"`apt-get download {spec}` failed:\n{result.stderr.strip()}\nThe pinned versions are "
                                 f"Debian 12 (bookworm) ones; run `apt-get update` first, use --any_version to "
                                 f"take what apt offers (the output will then differ from the shipped files), or "
                                 f"fetch them from https://snapshot.debian.org and pass --debs_dir.")
        root = work_dir / "root" / package
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([dpkg_deb, "-x", str(deb), str(root)], check=True)
        roots[package] = root
        versions[package] = deb.name.split("_")[1].replace("%3a", ":")
        print(f"  {deb.name}", file=sys.stderr)
    return roots, versions


def find_deb(directory: Path, package: str, version: str | None) -> Path | None:
    # .deb file names escape ':' (epochs) as %3a; none of ours has an epoch.
    candidates = sorted(directory.glob(f"{package}_*.deb"))
    if version is not None:
        candidates = [c for c in candidates if c.name.startswith(f"{package}_{version}_")]
    return candidates[-1] if candidates else None


def read_changelog(deb_root: Path, package: str) -> str:
    for name in ("changelog.Debian.gz", "changelog.gz"):
        path = deb_root / "usr/share/doc" / package / name
        if path.exists():
            return gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    raise BuildError(f"{package} has no changelog under usr/share/doc/{package}")


def changelog_timestamp(deb_root: Path, package: str) -> str:
    """The date of the package's latest changelog entry, as C4 writes timestamps (UTC, second precision)."""
    for line in read_changelog(deb_root, package).splitlines():
        if line.startswith(" -- "):
            date = email.utils.parsedate_to_datetime(line.split(">", 1)[1].strip())
            return date.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    raise BuildError(f"no dated entry in the changelog of {package}")


def read_pages(root: Path, exclude: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    if not root.is_dir():
        raise BuildError(f"{root} is missing: has the package layout changed?")
    for path in sorted(root.rglob("*.html")):
        relpath = path.relative_to(root).as_posix()
        if not exclude.search(relpath):
            yield relpath, path.read_text(encoding="utf-8", errors="replace")


def kjv_listing(roots: dict[str, Path]) -> list[str]:
    """Every verse of the KJV, one per line (`Ge1:1 In the beginning ...`), from the `bible` program."""
    program = roots["bible-kjv"] / KJV_PROGRAM
    env = dict(os.environ, LC_ALL="C.UTF-8")
    # The program needs libreadline.so.8; the extracted copy is used whether or not the system has one.
    libs = sorted(str(p.parent) for p in roots["libreadline8"].rglob("libreadline.so.8"))
    env["LD_LIBRARY_PATH"] = ":".join(libs + [env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else libs)
    data_dir = roots["bible-kjv-text"] / KJV_DATA_DIR
    result = subprocess.run([str(program), "-f", "-p", str(data_dir), "gen1:1-rev22:21"], env=env,
                            capture_output=True, stdin=subprocess.DEVNULL)
    lines = result.stdout.decode("latin-1").splitlines()  # the KJV text is plain ASCII
    if result.returncode != 0 or len(lines) != 31102:
        raise BuildError(f"`bible` failed or printed {len(lines)} verses instead of 31102 "
                         f"(exit {result.returncode}): {result.stderr.decode(errors='replace')[:500]}")
    return lines


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------
def read_protobuf_fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """Yield (field number, wire type, value) of a serialised protobuf message, one level deep.

    Just enough of the wire format to read SentencePiece's ModelProto without the protobuf package.
    """
    def varint(position: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            byte = data[position]
            value |= (byte & 0x7F) << shift
            position += 1
            if byte < 0x80:
                return value, position
            shift += 7

    position = 0
    while position < len(data):
        key, position = varint(position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = varint(position)
            yield number, wire_type, value
        elif wire_type == 1:
            yield number, wire_type, data[position:position + 8]
            position += 8
        elif wire_type == 2:
            length, position = varint(position)
            yield number, wire_type, data[position:position + length]
            position += length
        elif wire_type == 5:
            yield number, wire_type, data[position:position + 4]
            position += 4
        else:
            raise BuildError(f"unsupported protobuf wire type {wire_type}")


def precompiled_charsmap(model_proto: bytes) -> bytes:
    """ModelProto.normalizer_spec (field 3) .precompiled_charsmap (field 2): the compiled normalisation rules."""
    for number, wire_type, value in read_protobuf_fields(model_proto):
        if number == 3 and wire_type == 2:
            assert isinstance(value, bytes)
            for inner_number, inner_type, inner_value in read_protobuf_fields(value):
                if inner_number == 2 and inner_type == 2:
                    assert isinstance(inner_value, bytes)
                    return inner_value
    raise BuildError("the SentencePiece model has no precompiled normalisation charsmap")


def training_sentences(documents: Iterable[Document]) -> Iterator[str]:
    for document in documents:
        yield from document.text.split("\n")


def train_sentencepiece(train_documents: Sequence[Document], vocab_size: int) -> bytes:
    """A T5-style SentencePiece unigram model (serialised) trained on the train documents' paragraphs."""
    import sentencepiece as spm

    spm.set_random_generator_seed(SEED)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=training_sentences(train_documents), model_writer=model,
        model_type="unigram", vocab_size=vocab_size,
        # Every character of the train split gets a piece (about 150, mostly ASCII): with the default 0.9995 the
        # rarer ASCII symbols (! < > \\ & | $) fall below the cut-off of this small corpus and become <unk>.
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",  # as t5-base's spiece.model
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1, pad_piece=PAD, eos_piece=EOS, unk_piece=UNK,
        byte_fallback=False, max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=1,  # several threads make the EM sums, and so the scores, depend on scheduling
        minloglevel=2,
    )
    return model.getvalue()


def build_fast_tokenizer(model_proto: bytes):
    """A `tokenizers.Tokenizer` equivalent to the SentencePiece model, T5-style: `</s>` appended, no bos."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
    # SentencePiece's own normaliser (nmt_nfkc), then its remove_extra_whitespaces: collapse runs, strip ends.
    tokenizer.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(model_proto)),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Strip(),
    ])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, EOS_ID)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD, EOS, UNK)])
    return tokenizer


def save_tokenizer(model_proto: bytes, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(model_proto), pad_token=PAD, eos_token=EOS, unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH, padding_side="right", truncation_side="right",
        clean_up_tokenization_spaces=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "spiece.model").write_bytes(model_proto)
    # transformers 5 writes its own class name (TokenizersBackend); the generic PreTrainedTokenizerFast loads
    # the same tokenizer.json there (as TokenizersBackend) and in transformers 4 too. Sorted keys keep it stable.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out_dir / name
        if path.exists():
            config = json.loads(path.read_text())
            if "tokenizer_class" in config:
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def verify_tokenizer(out_dir: Path, validation: Sequence[Document], vocab_size: int) -> dict[str, float]:
    """Load the saved tokenizer the way the training code does and check every property it relies on.

    Returns statistics for the README. Raises BuildError on the first violated property.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir), model_max_length=1 << 30)  # whole documents, no warnings
    sp = spm.SentencePieceProcessor(model_file=str(out_dir / "spiece.model"))

    def check(condition: bool, message: str) -> None:
        if not condition:
            raise BuildError(f"tokenizer check failed: {message}")

    check(tok.is_fast, f"not a fast tokenizer ({type(tok).__name__})")
    check(len(tok) == vocab_size and tok.vocab_size == vocab_size,
          f"len={len(tok)}, vocab_size={tok.vocab_size}, expected {vocab_size}")
    check((tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID),
          f"pad/eos/unk = {tok.pad_token_id}/{tok.eos_token_id}/{tok.unk_token_id}")
    check(tok.bos_token_id is None, f"has a bos token {tok.bos_token!r}")
    check(tok.convert_ids_to_tokens([0, 1, 2]) == [PAD, EOS, UNK], "ids 0/1/2 are not <pad>, </s>, <unk>")
    ids = tok("Hello world.")["input_ids"]
    check(ids[-1] == EOS_ID and EOS_ID not in ids[:-1], f"eos not appended exactly once: {ids}")
    long_text = validation[0].text
    truncated = tok(long_text, truncation=True, max_length=16)["input_ids"]
    check(len(truncated) == 16 and truncated[-1] == EOS_ID, f"truncation drops eos: {truncated}")
    padded = tok("Hello world.", padding="max_length", max_length=16)
    check(padded["input_ids"][len(ids):] == [PAD_ID] * (16 - len(ids)) and padded["input_ids"][:len(ids)] == ids,
          f"not right-padded with {PAD_ID}: {padded['input_ids']}")
    check(padded["attention_mask"] == [1] * len(ids) + [0] * (16 - len(ids)), "attention mask does not match padding")

    tokens = unknown = mismatched = 0
    for document in validation:
        encoded = tok(document.text)["input_ids"]
        check(encoded[-1] == EOS_ID, "a validation document's encoding does not end with eos")
        body = encoded[:-1]
        tokens += len(body)
        unknown += body.count(UNK_ID)
        mismatched += body != sp.encode(document.text)
        decoded = tok.decode(encoded, skip_special_tokens=True)
        if UNK_ID not in body:
            check(normalize_space(decoded) == normalize_space(sp.decode(body)),
                  f"decode differs from SentencePiece's for {document.url}")
            # nmt_nfkc folds a few characters (e.g. full-width forms), so compare after NFKC.
            check(normalize_space(unicodedata.normalize("NFKC", decoded))
                  == normalize_space(unicodedata.normalize("NFKC", document.text)),
                  f"round trip fails for {document.url}")
    unk_rate = unknown / tokens
    check(unk_rate < MAX_VALIDATION_UNK_RATE, f"unk rate {unk_rate:.4%} on validation text")
    check(mismatched <= len(validation) // 100, f"{mismatched} of {len(validation)} validation documents encode "
                                                 f"differently from SentencePiece itself")
    return {"validation_tokens": tokens, "unk_rate": unk_rate, "spm_mismatches": mismatched}


def count_tokens(tokenizer_dir: Path, documents: Sequence[Document]) -> int:
    """Tokens of text (eos not counted)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=1 << 30)
    total = 0
    batch = 256
    for start in range(0, len(documents), batch):
        encoded = tok([d.text for d in documents[start:start + batch]], add_special_tokens=False)["input_ids"]
        total += sum(len(ids) for ids in encoded)
    return total


# ------------------------------------------------------------------------------------------------------------
# READMEs
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Stats:
    versions: dict[str, str]
    timestamps: dict[str, str]
    source_docs: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # extracted, chars, kept, chars
    shard_info: list[tuple[str, int, int, int]] = field(default_factory=list)  # name, docs, text chars, bytes
    train_tokens: int = 0
    tokenizer: dict[str, float] = field(default_factory=dict)


def dataset_readme(stats: Stats) -> str:
    v = stats.versions
    train = [s for s in stats.shard_info if "-train." in s[0]]
    valid = [s for s in stats.shard_info if "-validation." in s[0]]
    rows = "\n".join(f"| `en/{name}` | {docs:,} | {chars:,} | {size:,} |" for name, docs, chars, size in stats.shard_info)
    sources = "\n".join(
        f"| {label} | {extracted:,} | {extracted_chars:,} | {kept:,} | {kept_chars:,} |"
        for label, (extracted, extracted_chars, kept, kept_chars) in stats.source_docs.items())
    total_bytes = sum(s[3] for s in stats.shard_info)
    return f"""# A small C4-layout sample of real English prose

This directory stands in for [allenai/c4](https://huggingface.co/datasets/allenai/c4) (`en`) when the Hugging
Face hub cannot be reached: the same file names (`en/c4-train.XXXXX-of-NNNNN.json.gz`,
`en/c4-validation.XXXXX-of-NNNNN.json.gz`) and the same records (gzip'd JSON lines with the keys `text`,
`timestamp`, `url`, in that order). It is **not** C4 text: it is real, human-written English from three
documentation and book sources that Debian packages, so it can be rebuilt anywhere with `apt-get download`.
It is meant for smoke tests and CPU demos, not for results comparable to the paper's.

## Sources and licenses

| source (`url` prefix) | Debian package, version | license |
|---|---|---|
| Python 3.11 documentation (`https://docs.python.org/3.11/`) | `python3.11-doc` {v['python3.11-doc']} | PSF License Agreement ("Python software and documentation are licensed under the PSF License Agreement", https://docs.python.org/3.11/license.html; `/usr/share/doc/python3.11-doc/copyright`). Copyright © 2001-2023 Python Software Foundation; All Rights Reserved. |
| SQLite documentation (`https://www.sqlite.org/`) | `sqlite3-doc` {v['sqlite3-doc']} | public domain (`/usr/share/doc/sqlite3-doc/copyright`: "License: public-domain", D. Richard Hipp) |
| King James Bible (`https://bible-kjv-text.invalid/`, a pseudo-URL: there is no canonical page) | `bible-kjv-text` {v['bible-kjv-text']}, read with the `bible` program of `bible-kjv` {v['bible-kjv']} | public domain: "The copyright for the King James Version text of the Bible is expired since the translation was done in 1611" (`/usr/share/doc/bible-kjv-text/copyright`; the data file is "provided for unrestricted use"). In the United Kingdom the KJV remains under the Crown's letters patent. |

`libreadline8` {v['libreadline8']} (GPL-3+) is also downloaded, only so that the `bible` program runs; no text
comes from it.

`timestamp` is the date of the package's latest Debian changelog entry ({stats.timestamps['python']} for Python,
{stats.timestamps['sqlite']} for SQLite, {stats.timestamps['kjv']} for the KJV). `url` is the public page the
text comes from, with the fragment id of the section where the document starts; several documents can come
from one page (one per section or part of a long section), and a KJV chapter split in parts gets `?part=N`.

## How the text was extracted

* HTML pages are parsed with Python's `html.parser`. Only the text of block elements is kept (for the Python
  docs, only Sphinx's main body); `<pre>`, code highlighting, tables, scripts, forms, sidebars, navigation and
  permalink signs are dropped. Index, search, table-of-contents and changelog pages are skipped
  (Python: `genindex*`, `py-modindex`, `search`, `contents`, `whatsnew/changelog`; SQLite: `releaselog/`,
  `changes`, `chronology`, `sitemap`, `keyword_index`, `doclist`, `toc`).
* C4's line filters are applied to each paragraph: it must end in terminal punctuation (`.`, `!`, `?` or a
  closing quote), have at least 5 words, and contain no "javascript" and no curly bracket (C4 drops whole pages
  with a curly bracket; here only the paragraph goes). Paragraphs seen before anywhere in the sample are dropped
  (exact deduplication, case-insensitive).
* Paragraphs are joined with newlines into documents of {MIN_DOC_CHARS}–{MAX_DOC_CHARS} characters, ending at a
  section boundary where possible (one over-long paragraph is kept whole); documents with fewer than
  {MIN_DOC_SENTENCES} sentences are dropped. KJV verses lose their numbers and are joined into paragraphs of
  about {KJV_PARAGRAPH_CHARS} characters that end at a sentence end (the same line filters then apply), one
  document per chapter (long chapters in parts).
* Each source's documents are shuffled (seed {SEED}) and taken up to a character budget
  ({", ".join(f"{k} {b:,}" for k, b in SOURCE_CHAR_BUDGET.items())}); then all are shuffled together, the first
  {VALIDATION_FRACTION:.0%} become validation, and each split is dealt round-robin into its shards. No text is in
  both splits. Shards are gzip'd with mtime 0, so a rebuild is byte-identical.

| source | documents extracted | characters | documents kept | characters kept |
|---|---:|---:|---:|---:|
{sources}

## Files

| file | documents | characters of text | bytes (gzip) |
|---|---:|---:|---:|
{rows}

* Train: {sum(s[1] for s in train):,} documents, {sum(s[2] for s in train):,} characters, {stats.train_tokens:,} tokens
  with `data/tokenizer` (eos not counted).
* Validation: {sum(s[1] for s in valid):,} documents, {sum(s[2] for s in valid):,} characters,
  {int(stats.tokenizer['validation_tokens']):,} tokens.
* All shards: {total_bytes / 1e6:.2f} MB.

## Rebuild

```
.venv/bin/python scripts/build_c4_sample.py --out data/c4_sample --tokenizer_out data/tokenizer
```

It needs `apt-get` and `dpkg-deb` (Debian/Ubuntu) and downloads the pinned package versions above (Debian 12
"bookworm"); see the script's docstring for `--debs_dir` and `--any_version`. It rebuilds the shards, this
README and the tokenizer in `data/tokenizer`, and checks the tokenizer before it finishes.
"""


def tokenizer_readme(stats: Stats, vocab_size: int) -> str:
    t = stats.tokenizer
    return f"""# Tokenizer for the C4 sample

A T5-style SentencePiece unigram tokenizer with exactly {vocab_size:,} ids, trained by
`scripts/build_c4_sample.py` on the paragraphs of the train split of `data/c4_sample` only (SentencePiece
{_version('sentencepiece')}, `nmt_nfkc` normalisation as t5-base, character coverage 1.0, no byte fallback,
seed {SEED}, one thread). Ids: `<pad>` = {PAD_ID}, `</s>` (eos) = {EOS_ID}, `<unk>` = {UNK_ID}, no bos, no
`<extra_id_*>` sentinels. `tokenizer.json` is a `tokenizers` Unigram model built from the SentencePiece pieces
and scores, with SentencePiece's own precompiled normaliser, a Metaspace pre-tokenizer/decoder and a post-processor
that appends `</s>` as T5 does (also under truncation); load it with
`transformers.AutoTokenizer.from_pretrained("data/tokenizer")`. `spiece.model` is the SentencePiece model itself,
for reference. On the validation split: {int(t['validation_tokens']):,} tokens, unk rate {t['unk_rate']:.4%},
{int(t['spm_mismatches'])} documents tokenised differently from SentencePiece.
"""


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ------------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------------
def build(out: Path, tokenizer_out: Path, work_dir: Path, debs_dir: Path | None, any_version: bool,
          vocab_size: int) -> None:
    print("fetching packages", file=sys.stderr)
    roots, versions = fetch_packages(work_dir, debs_dir, any_version)
    timestamps = {
        "python": changelog_timestamp(roots["python3.11-doc"], "python3.11-doc"),
        "sqlite": changelog_timestamp(roots["sqlite3-doc"], "sqlite3-doc"),
        "kjv": changelog_timestamp(roots["bible-kjv-text"], "bible-kjv-text"),
    }
    stats = Stats(versions=versions, timestamps=timestamps)

    print("extracting text", file=sys.stderr)
    seen: set[str] = set()  # paragraph hashes, shared so that no paragraph repeats across sources
    extracted = {
        "python": html_documents(read_pages(roots["python3.11-doc"] / PYTHON_DOC_ROOT, PYTHON_EXCLUDE),
                                 "https://docs.python.org/3.11/", timestamps["python"], seen, ("role", "main")),
        "sqlite": html_documents(read_pages(roots["sqlite3-doc"] / SQLITE_DOC_ROOT, SQLITE_EXCLUDE),
                                 "https://www.sqlite.org/", timestamps["sqlite"], seen),
        "kjv": kjv_documents(kjv_listing(roots), timestamps["kjv"], seen),
    }
    documents: list[Document] = []
    for index, (label, docs) in enumerate(extracted.items()):
        kept = take_budget(docs, SOURCE_CHAR_BUDGET[label], SEED + index)
        stats.source_docs[label] = (len(docs), sum(len(d.text) for d in docs), len(kept), sum(len(d.text) for d in kept))
        print(f"  {label}: {len(docs)} documents, kept {len(kept)}", file=sys.stderr)
        documents.extend(kept)

    train_shards, validation_shards = split_and_shard(documents, SEED, VALIDATION_FRACTION, NUM_TRAIN_SHARDS,
                                                      NUM_VALIDATION_SHARDS)
    shard_dir = out / "en"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    shard_dir.mkdir(parents=True)
    for split, shards in (("train", train_shards), ("validation", validation_shards)):
        for index, shard in enumerate(shards):
            name = shard_name(split, index, len(shards))
            payload = shard_bytes(shard)
            (shard_dir / name).write_bytes(payload)
            stats.shard_info.append((name, len(shard), sum(len(d.text) for d in shard), len(payload)))
    train = [d for shard in train_shards for d in shard]
    validation = [d for shard in validation_shards for d in shard]

    print(f"training the tokenizer on {len(train)} documents", file=sys.stderr)
    model_proto = train_sentencepiece(train, vocab_size)
    save_tokenizer(model_proto, tokenizer_out)
    stats.tokenizer = verify_tokenizer(tokenizer_out, validation, vocab_size)
    stats.train_tokens = count_tokens(tokenizer_out, train)
    (tokenizer_out / "README.md").write_text(tokenizer_readme(stats, vocab_size))
    (out / "README.md").write_text(dataset_readme(stats))
    print(f"done: {len(train)} train / {len(validation)} validation documents, {stats.train_tokens:,} train tokens, "
          f"unk rate {stats.tokenizer['unk_rate']:.4%}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/c4_sample"), help="dataset directory (gets en/)")
    parser.add_argument("--tokenizer_out", type=Path, default=Path("data/tokenizer"))
    parser.add_argument("--debs_dir", type=Path, default=None, help="use the .deb files in this folder")
    parser.add_argument("--any_version", action="store_true", help="do not pin the package versions")
    parser.add_argument("--keep_work_dir", type=Path, default=None, help="keep downloads and extracted trees here")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    try:
        if args.keep_work_dir is not None:
            args.keep_work_dir.mkdir(parents=True, exist_ok=True)
            build(args.out, args.tokenizer_out, args.keep_work_dir.resolve(), args.debs_dir, args.any_version,
                  args.vocab_size)
        else:
            with tempfile.TemporaryDirectory(prefix="c4_sample_") as tmp:
                build(args.out, args.tokenizer_out, Path(tmp), args.debs_dir, args.any_version, args.vocab_size)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
