"""`prepare`: tokenize a dataset once and write the inputs every teacher run will see.

The source is streamed in batches and written chunk by chunk, so memory is bounded by the chunk
size, not the dataset. Documents longer than `max_length` are split into consecutive windows
(nothing is dropped); with `pack=True` short documents are joined (separated by EOS) into
full-length sequences and their start offsets are recorded. The manifest is written last: a
cache without one was never finished and is cleared by the next `prepare`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mtkd_cache._version import FORMAT_NAME
from mtkd_cache.errors import (
    CacheExistsError,
    CacheFormatError,
    CacheNotFoundError,
    InputDataError,
    write_error,
)
from mtkd_cache.format.fingerprint import (
    DatasetHasher,
    sample_content,
    sample_hash,
    tokenizer_fingerprint,
)
from mtkd_cache.format.inputs import InputsWriter, Sample
from mtkd_cache.format.meta import InputsMeta, Manifest, TokenizerInfo
from mtkd_cache.format.store import CacheStore
from mtkd_cache.precompute.chat_source import ChatColumns, chat_columns, chat_samples
from mtkd_cache.precompute.sources import iter_source
from mtkd_cache.precompute.text_spans import text_pieces, window_texts

__all__ = ["prepare", "prepare_arrays", "load_tokenizer"]


def load_tokenizer(path: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InputDataError(
            f"--tokenizer {str(path)!r} could not be loaded ({e}); pass a folder holding tokenizer "
            f"files (tokenizer.json or vocab files), e.g. the teacher's model folder"
        ) from e


def _source_key(data: str | os.PathLike[str]) -> str:
    """The source as recorded in settings: local paths absolute, so ./x and /abs/x are the same input."""
    return os.path.abspath(data) if os.path.exists(data) else str(data)


def _source_signature(data: str | os.PathLike[str]) -> list[list[Any]] | None:
    """Size and mtime of each local source file: a changed file is not "already prepared"."""
    p = Path(data)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
    else:
        return None  # a dataset id: its revision is the hub's business
    return [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _windows(ids: list[int], max_length: int) -> Iterator[tuple[list[int], list[int]]]:
    for start in range(0, len(ids), max_length):
        yield ids[start : start + max_length], [0]


def _packed(docs: Iterator[tuple[int, list[int]]], max_length: int, eos: int) -> Iterator[tuple[int, list[int], list[int]]]:
    """Join documents (each followed by EOS) and cut into `max_length` sequences."""
    buf: list[int] = []
    starts: list[int] = []
    first_row = -1
    for row, ids in docs:
        if first_row < 0:
            first_row = row
        starts.append(len(buf))
        buf.extend(ids + [eos])
        while len(buf) >= max_length:
            yield first_row, buf[:max_length], [s for s in starts if s < max_length]
            buf = buf[max_length:]
            starts = [s - max_length for s in starts if s >= max_length]
            first_row = row
    if buf:
        yield first_row, buf, starts


# Everything mtkd writes at a cache's root; `prepare` never deletes any other entry.
MTKD_ROOT_KEYS = ("manifest.json", "zarr.json", "inputs", "teachers", "tokenizations")
_LEFTOVER = re.compile(r"^\.write-probe-[0-9a-f]+$|\.tmp-[0-9a-f]+$")  # CacheStore's own half-written files


def _manifest_is_foreign(store: CacheStore) -> bool:
    """A `manifest.json` that parses but is not mtkd's (a corrupt one counts as mtkd's)."""
    try:
        value = json.loads(store.read_bytes("manifest.json"))
    except (CacheNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return not isinstance(value, dict) or value.get("format") != FORMAT_NAME


def _check_destination(store: CacheStore, data: str | os.PathLike[str] | None) -> None:
    """Refuse a folder that holds anything mtkd did not write, unless it is an mtkd cache.

    An mtkd cache (a manifest of format mtkd) may hold other files too: they are left alone.
    Without one, only mtkd's own keys (an interrupted `prepare`) may be there. `data` inside
    a key that a rewrite deletes, or a cache inside `data`, is refused too.
    """
    names = store.listdir("")
    foreign = [n for n in names if n not in MTKD_ROOT_KEYS and not _LEFTOVER.search(n)]
    if "manifest.json" in names and _manifest_is_foreign(store):
        foreign.insert(0, "manifest.json")
        is_cache = False
    else:
        is_cache = "manifest.json" in names
    if foreign and not is_cache:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CacheExistsError(
            f"{store.url} is not empty and is not an mtkd cache (found {shown}); prepare writes only into "
            f"an empty folder or an mtkd cache and deletes nothing else: choose a new or empty folder")
    if data is None or not store.is_local or not os.path.exists(data):
        return
    src, root = os.path.realpath(data), os.path.realpath(store.root)
    for key in MTKD_ROOT_KEYS:
        if _is_within(src, os.path.join(root, key)):
            raise InputDataError(f"--data {str(data)!r} lies inside the cache's {key!r}, which prepare "
                                 f"rewrites; move the data out of {store.url}")
    if _is_within(root, src):
        raise InputDataError(f"cache {store.url} lies inside --data {str(data)!r}; put the cache elsewhere")


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _claim(store: CacheStore, settings: dict[str, Any], overwrite: bool,
           data: str | os.PathLike[str] | None = None) -> InputsMeta | None:
    """Return existing inputs if they match `settings`; clear mtkd's keys if allowed; else refuse."""
    _check_destination(store, data)
    if store.exists("manifest.json") and store.exists("inputs/inputs.json"):
        try:
            Manifest.from_dict(store.read_json("manifest.json"))  # corrupt / unknown version: never "already done"
            existing = InputsMeta.from_dict(store.read_json("inputs/inputs.json"))
        except CacheFormatError:
            if not overwrite:
                raise
            existing = None
        if existing is not None and existing.source.get("settings") == settings:
            return existing  # --overwrite replaces inputs made with other settings only: nothing is lost
        if existing is not None and not overwrite:
            old = existing.source.get("settings") or {}
            diff = ", ".join(f"{k}: stored {old.get(k)!r} vs now {settings.get(k)!r}"
                             for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise CacheExistsError(
                f"{store.url} already holds inputs prepared with other settings or source content "
                f"({diff}); pass --overwrite to replace them (this deletes every cached teacher) "
                f"or choose another cache path"
            )
    for key in store.listdir(""):  # `_check_destination` refused every entry mtkd did not write
        if key in MTKD_ROOT_KEYS or _LEFTOVER.search(key):
            store.remove(key)
    return None


def _one_line_writes(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A failed write (a full disk, no permission) anywhere in `fn` becomes a one-line error."""
    @functools.wraps(fn)
    def wrapper(cache: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(cache, *args, **kwargs)
        except OSError as e:
            err = write_error(e, str(cache), "preparing the inputs")
            if err is e:
                raise
            raise err from e

    return wrapper


@_one_line_writes
def prepare(
    cache: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    tokenizer: str | os.PathLike[str],
    max_length: int,
    text_column: str = "text",
    label_column: str | None = None,
    domain_column: str | None = None,
    split: str = "train",
    pack: bool = False,
    chunk_samples: int | None = None,
    max_samples: int | None = None,
    overwrite: bool = False,
    batch_size: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    messages_column: str | None = None,
    prompt_column: str | None = None,
    completion_column: str | None = None,
    train_on: str | None = None,
) -> InputsMeta:
    """Tokenize `data` once and write it as the cache's inputs.

    Args:
        cache: Cache path or fsspec URL.
        data: Local text/json/jsonl/parquet/csv file(s) or folder, a saved HF dataset, or a dataset id.
        tokenizer: Tokenizer folder (or id); its files are copied into the cache.
        max_length: Positions per sample; longer documents are split into windows.
        text_column / label_column / domain_column: Source columns to read.
        pack: Join short documents into full `max_length` sequences (boundaries recorded).
        chunk_samples: Samples per chunk (the unit of work and commit); default ~32k positions.
        max_samples: Stop after this many samples.
        overwrite: Replace inputs prepared with other settings (and every teacher); inputs with
            these settings are kept as they are.
        messages_column: Instruction data: a column of conversations, rendered with the tokenizer's
            chat template (one sample per row, a stored loss mask; docs/INSTRUCTION.md).
        prompt_column / completion_column: Instruction data as prompt/completion pairs.
        train_on: ``"assistant"`` (default for instruction data: replies / completions only) or ``"all"``.

    Returns:
        The inputs metadata written to `inputs/inputs.json`.

    Raises:
        CacheExistsError: the cache holds inputs made with other settings and `overwrite` is off.
        InputDataError: the source or tokenizer cannot be used as asked.
        CacheWriteError: the destination is not writable.
    """
    if max_length <= 1:
        raise InputDataError(f"--max-length must be > 1, got {max_length}")
    if label_column is not None and pack:
        raise InputDataError("--pack joins documents, so per-document --label-column cannot be kept; drop one")
    chat = chat_columns(messages_column, prompt_column, completion_column, train_on, pack=pack,
                        label_column=label_column)
    store = CacheStore(cache, storage_options)
    store.check_writable()
    tok = load_tokenizer(tokenizer, trust_remote_code)
    fp = tokenizer_fingerprint(tok)
    settings = {
        "data": _source_key(data), "source_files": _source_signature(data), "split": split, "tokenizer": fp, "max_length": max_length,
        "text_column": text_column, "label_column": label_column, "domain_column": domain_column,
        "pack": pack, "max_samples": max_samples, **(chat.settings(tok) if chat else {}),
    }
    existing = _claim(store, settings, overwrite, data)
    if existing is not None:
        return existing
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    if pack and eos is None:
        raise InputDataError(f"--pack needs an EOS or SEP token; tokenizer {str(tokenizer)!r} has neither")
    info = TokenizerInfo(fingerprint=fp, vocab_size=len(tok), name_or_path=str(tokenizer),
                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
    _copy_tokenizer(store, tok)

    columns = [text_column] + [c for c in (label_column, domain_column) if c]
    chunk_samples = chunk_samples or max(1, 32768 // max_length)
    pieces = text_pieces(tok, pack)
    hasher = DatasetHasher({"kind": "tokens", "tokenizer": fp, "max_length": max_length, "pack": pack,
                            **({"loss_mask": chat.train_on} if chat else {})})
    with InputsWriter(store, kind="tokens", chunk_samples=chunk_samples, positions_per_sample=max_length,
                      token_dtype="int32" if len(tok) > 1 << 16 else "uint16", loss_mask=chat is not None,
                      with_text=pieces is not None) as writer:
        with tqdm(desc="prepare", unit=" samples", disable=not progress) as bar:  # closed on errors too
            for i, s in enumerate(_samples(tok, data, chat, split=split, columns=columns, batch_size=batch_size,
                                           text_column=text_column, label_column=label_column,
                                           domain_column=domain_column, pack=pack, max_length=max_length, eos=eos,
                                           pieces=pieces)):
                if max_samples is not None and i >= max_samples:
                    break
                writer.add(s)
                bar.update(1)
        return writer.finish(hasher, max_length=max_length, tokenizer=info, settings=settings, source=str(data),
                             packed=pack)


def _samples(tok: Any, data: Any, chat: ChatColumns | None, *, split: str, columns: list[str], batch_size: int,
             text_column: str, label_column: str | None, domain_column: str | None, pack: bool, max_length: int,
             eos: int | None, pieces: Sequence[bytes | None] | None) -> Iterator[Sample]:
    """The samples to write: masked instruction samples, or text documents cut or packed to `max_length`."""
    if chat is not None:
        return chat_samples(tok, data, chat, split=split, max_length=max_length, batch_size=batch_size,
                            domain_column=domain_column, pieces=pieces)
    docs = _documents(tok, data, split=split, columns=columns, batch_size=batch_size, text_column=text_column,
                      label_column=label_column, domain_column=domain_column, pack=pack)
    return _token_samples(docs, max_length, pack=pack, eos=-1 if eos is None else eos,
                          labelled=label_column is not None, pieces=pieces)


def _documents(tok: Any, data: Any, *, split: str, columns: list[str], batch_size: int, text_column: str,
               label_column: str | None, domain_column: str | None, pack: bool
               ) -> Iterator[tuple[int, list[int], Any, Any, str]]:
    """``(source row, token ids, label, domain, text)`` of every document, tokenized in batches."""
    row = 0
    for batch in iter_source(data, split=split, columns=columns, batch_size=batch_size):
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        enc = tok(texts, add_special_tokens=not pack, truncation=False)["input_ids"]
        labels = batch[label_column] if label_column else [None] * len(texts)
        domains = batch[domain_column] if domain_column else [None] * len(texts)
        for ids, lab, dom, text in zip(enc, labels, domains, texts):
            yield row, list(ids), lab, dom, text
            row += 1


def _token_samples(docs: Iterator[tuple[int, list[int], Any, Any, str]], max_length: int, *, pack: bool,
                   eos: int, labelled: bool, pieces: Sequence[bytes | None] | None = None) -> Iterator[Sample]:
    """Documents -> samples: packed to `max_length`, one truncated sample per labelled document, or windows."""
    if pack:
        src = ((row, ids) for row, ids, *_ in docs if ids)
        for row, ids, starts in _packed(src, max_length, eos):
            yield Sample(row, (np.asarray(ids, dtype=np.int64),), None, None, starts)
        return
    for row, ids, lab, dom, text in docs:
        if len(ids) < 2 and not labelled:
            continue  # a single token teaches a causal LM nothing
        windows = [(ids[:max_length], [0])] if labelled else list(_windows(ids, max_length))
        texts = window_texts(ids, text, max_length, pieces) if pieces is not None else [None] * len(windows)
        for (piece, _starts), covered in zip(windows, texts):
            yield Sample(row, (np.asarray(piece, dtype=np.int64),), lab, dom, None, text=covered)


@_one_line_writes
def prepare_arrays(
    cache: str | os.PathLike[str],
    arrays: Mapping[str, np.ndarray],
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    domains: Sequence[str] | None = None,
    chunk_samples: int = 4096,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    name: str = "arrays",
) -> InputsMeta:
    """Write fixed-shape inputs (images, features) as the cache's inputs: one position per sample.

    Args:
        cache: Cache path or fsspec URL.
        arrays: Input name (the teacher's forward keyword, e.g. "pixel_values") -> array (N, ...).
        labels: Optional integer class per sample; None or a negative value marks an unlabelled
            sample (transfer-set distillation: soft labels only). domains: optional name per sample.
        chunk_samples: Samples per chunk.
        overwrite: Replace inputs with other content.

    Raises:
        InputDataError: arrays of different lengths, or labels/domains of the wrong length.
    """
    if not arrays:
        raise InputDataError("prepare_arrays needs at least one array")
    lengths = {k: len(v) for k, v in arrays.items()}
    n = next(iter(lengths.values()))
    for what, seq in (("labels", labels), ("domains", domains)):
        if seq is not None and len(seq) != n:
            lengths[what] = len(seq)
    if len(set(lengths.values())) != 1:
        raise InputDataError(f"prepare_arrays: every array, labels and domains need the same length; got {lengths}")
    store = CacheStore(cache, storage_options)
    store.check_writable()
    names = sorted(arrays)
    hasher_settings = {"kind": "arrays", "names": names, "shapes": {k: list(arrays[k].shape[1:]) for k in names},
                       "dtypes": {k: str(arrays[k].dtype) for k in names}}
    content = DatasetHasher(hasher_settings)
    label_list = None if labels is None else [_label_or_none(v) for v in labels]
    for i in range(n):  # content fingerprint decides whether existing inputs can be kept
        lab = None if label_list is None else label_list[i]
        dom = None if domains is None else domains[i]
        content.update([sample_hash(sample_content([arrays[k][i] for k in names], lab, dom))])
    settings = {**hasher_settings, "content": content.hexdigest(), "domains": domains is not None}
    existing = _claim(store, settings, overwrite)
    if existing is not None:
        return existing
    with InputsWriter(store, kind="arrays", chunk_samples=chunk_samples, positions_per_sample=1,
                      array_specs={k: (arrays[k].shape[1:], arrays[k].dtype) for k in names}) as writer:
        for i in tqdm(range(n), desc="prepare", unit=" samples", mininterval=1.0, disable=n < 10000):
            writer.add(Sample(i, tuple(np.asarray(arrays[k][i]) for k in names),
                              None if label_list is None else label_list[i],
                              None if domains is None else domains[i], None))
        return writer.finish(DatasetHasher(settings), max_length=1, tokenizer=None, settings=settings, source=name,
                             packed=False)


def _label_or_none(value: object) -> int | None:
    if value is None:
        return None
    v = int(value)  # type: ignore[call-overload]
    return None if v < 0 else v


def _copy_tokenizer(store: CacheStore, tok: Any) -> None:
    if store.is_local:  # straight into the cache: a killed prepare leaves nothing outside it
        tok.save_pretrained(store.path("inputs/tokenizer"))
        return
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                store.write_bytes(f"inputs/tokenizer/{f.name}", f.read_bytes())
