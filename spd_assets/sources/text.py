"""Text for model sources: documents or token ids on disk, cut into fixed-length windows, drawn per member.

`text:` names a `.txt` file (one document), a `.jsonl` file (one document per line, in the field
`"text"`), a `.npy` file of token ids (`[sequences, seq_len]`, or a 1-D stream cut into windows),
or a directory of such files (read in sorted path order; text and token ids not mixed).
Documents are tokenized without special tokens and joined with the tokenizer's end-of-text token
(else its separator token) between them, as SPD's language-model data is; the stream is cut into
`seq_len` windows and the incomplete tail is dropped. No BOS/CLS token is added.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spd_assets.errors import SourceError

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIX = ".npy"
JSONL_TEXT_FIELD = "text"
# Documents per tokenizer call: batched calls are fast, and memory stays bounded.
TOKENIZE_DOCUMENTS_PER_CALL = 256
FILES_NAMED_IN_ERRORS = 8


def text_files(path: Path, field: str = "source.text") -> list[Path]:
    """The text or token-id files `path` names (itself, or those under it), checked to be one kind and not empty.

    `field` is the config key named in errors."""
    expected = f"a {', '.join(TEXT_SUFFIXES)} or {TOKEN_SUFFIX} file, or a directory of them"
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in files if p.suffix in (*TEXT_SUFFIXES, TOKEN_SUFFIX)]
        if not files:
            raise SourceError(f"{field}: {str(path)!r} holds no text: expected {expected}")
    else:
        raise SourceError(f"{field}: {str(path)!r} does not exist; expected {expected}")
    if files[0].suffix not in (*TEXT_SUFFIXES, TOKEN_SUFFIX):
        raise SourceError(f"{field}: {str(path)!r} is not {expected}")
    kinds = {file.suffix == TOKEN_SUFFIX for file in files}
    if len(kinds) > 1:
        raise SourceError(f"{field}: {str(path)!r} mixes text files and {TOKEN_SUFFIX} token ids; expected one kind")
    if not kinds.pop() and not any(_has_text(file) for file in files):
        shown = [file.name for file in files[:FILES_NAMED_IN_ERRORS]]
        raise SourceError(f"{field}: {str(path)!r} holds no text: its files {shown} are empty or blank")
    return files


def is_token_ids(files: Sequence[Path]) -> bool:
    """Whether the text files are token ids (`.npy`) rather than text."""
    return files[0].suffix == TOKEN_SUFFIX


def _has_text(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as handle:
        return any(line.strip() for line in handle)


def documents(files: Sequence[Path]) -> Iterator[str]:
    """Each document of the text files, in order; a bad `.jsonl` line is named by file and line number."""
    for path in files:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8")
            continue
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SourceError(f"source.text: {path}:{number}: not valid JSON ({error.msg})") from None
                text = record.get(JSONL_TEXT_FIELD) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise SourceError(
                        f"source.text: {path}:{number}: expected an object with a string field {JSONL_TEXT_FIELD!r}"
                    )
                yield text


def document_separator(tokenizer: Any) -> int | None:
    """The token put between documents: end-of-text (GPT-2 style), else the separator (BERT style), else none."""
    for attribute in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, attribute, None)
        if token_id is not None:
            return int(token_id)
    return None


def tokenized_windows(files: Sequence[Path], tokenizer: Any, seq_len: int) -> np.ndarray:
    """`[windows, seq_len]` int64 token ids of the documents, joined by the separator, tail dropped."""
    separator = document_separator(tokenizer)
    pieces: list[np.ndarray] = []
    pending: list[str] = []

    def tokenize_pending() -> None:
        # verbose=False: whole documents exceed the model's length on purpose; the windows do not.
        for ids in tokenizer(pending, add_special_tokens=False, verbose=False)["input_ids"]:
            if pieces and separator is not None:
                pieces.append(np.array([separator], dtype=np.int64))
            pieces.append(np.asarray(ids, dtype=np.int64))
        pending.clear()

    for document in documents(files):
        pending.append(document)
        if len(pending) == TOKENIZE_DOCUMENTS_PER_CALL:
            tokenize_pending()
    if pending:
        tokenize_pending()
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return stream[: len(stream) // seq_len * seq_len].reshape(-1, seq_len)


def token_id_windows(files: Sequence[Path], seq_len: int, field: str = "source.text") -> np.ndarray:
    """`.npy` token ids as `[windows, seq_len]` int64: `[n, seq_len]` arrays as they are, 1-D streams cut."""
    windows = []
    for path in files:
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise SourceError(f"{field}: {path}: cannot be read as a .npy array of token ids ({error})") from None
        if not np.issubdtype(ids.dtype, np.integer):
            raise SourceError(f"{field}: {path}: expected integer token ids, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[: len(ids) // seq_len * seq_len].reshape(-1, seq_len)
        elif ids.ndim != 2 or ids.shape[1] != seq_len:
            raise SourceError(
                f"{field}: {path}: expected token ids of shape [sequences, {seq_len}] (seq_len) "
                f"or a 1-D stream, got shape {tuple(ids.shape)}"
            )
        windows.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(windows)


def load_windows(path: Path, tokenizer: Any | None, seq_len: int, *, vocab_size: int | None = None) -> np.ndarray:
    """Every `seq_len` window of the text at `path`, as int64 token ids, checked against the vocabulary."""
    files = text_files(path)
    if is_token_ids(files):
        windows = token_id_windows(files, seq_len)
    elif tokenizer is None:
        raise SourceError(
            f"source.text: {str(path)!r} is text, but the model comes without a tokenizer; "
            f"expected {TOKEN_SUFFIX} token ids, or a model with a tokenizer"
        )
    else:
        windows = tokenized_windows(files, tokenizer, seq_len)
    if len(windows) == 0:
        raise SourceError(f"source.text: {str(path)!r} gives fewer than seq_len = {seq_len} tokens (one window)")
    if vocab_size is not None and (windows.min() < 0 or windows.max() >= vocab_size):
        raise SourceError(
            f"source.text: token ids must lie in [0, {vocab_size}) for this model, "
            f"got ids in [{windows.min()}, {windows.max()}]"
        )
    return windows


def check_enough_windows(n_windows: int, batch_size: int) -> None:
    """SourceError unless the text gives at least `batch_size` windows."""
    if batch_size > n_windows:
        raise SourceError(
            f"source.batch_size: {batch_size} sequences asked for, but the text gives only {n_windows} windows "
            "of seq_len tokens; expected at most that many (or more text)"
        )


def draw_windows(windows: np.ndarray, batch_size: int, seed: int) -> np.ndarray:
    """`batch_size` distinct windows chosen by `np.random.default_rng(seed)`, in drawn order."""
    check_enough_windows(len(windows), batch_size)
    chosen = np.random.default_rng(seed).choice(len(windows), size=batch_size, replace=False)
    return windows[chosen]
