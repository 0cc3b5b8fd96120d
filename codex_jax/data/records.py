"""JSON Lines datasets: pretraining corpus, demonstrations, preference pairs.

Every file is UTF-8 JSON Lines, one object per line, every field a non-empty
string and no other fields:

  corpus.jsonl  {"text"}
  demos.jsonl   {"prompt", "completion"}
  prefs.jsonl   {"prompt", "chosen", "rejected"}

Every defect raises ``DataError`` with ``"{path}:{lineno}: field 'x': ..."`` (or
``"{path}:{lineno}: ..."`` when no field applies) so a user can fix the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from codex_jax.errors import ConfigError, DataError

CORPUS_FIELDS = ("text",)
DEMO_FIELDS = ("prompt", "completion")
PREF_FIELDS = ("prompt", "chosen", "rejected")

CORPUS_FILE, DEMOS_FILE, PREFS_FILE = "corpus.jsonl", "demos.jsonl", "prefs.jsonl"

# What an empty file means, by schema, so the message says what is missing.
_EMPTY_WHAT = {
    CORPUS_FIELDS: "an empty corpus",
    DEMO_FIELDS: "no demonstrations",
    PREF_FIELDS: "no preference pairs",
}
_BOM = b"\xef\xbb\xbf"


def _check_strs(owner: str, **columns: object) -> None:
    """Raise DataError unless every column is a tuple of str, all of one length."""
    lengths = {}
    for name, col in columns.items():
        if not isinstance(col, tuple):
            raise DataError(f"{owner}.{name} must be a tuple of str, got {type(col).__name__}")
        if not all(isinstance(s, str) for s in col):
            bad = next(s for s in col if not isinstance(s, str))
            raise DataError(f"{owner}.{name} must hold only str, got {type(bad).__name__}")
        lengths[name] = len(col)
    if len(set(lengths.values())) > 1:
        raise DataError(f"{owner} columns differ in length: {lengths}")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Pretraining documents."""

    texts: tuple[str, ...]

    def __post_init__(self):
        _check_strs("Corpus", texts=self.texts)

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(frozen=True)
class Demos:
    """Supervised demonstrations: prompts[i] -> completions[i]."""

    prompts: tuple[str, ...]
    completions: tuple[str, ...]

    def __post_init__(self):
        _check_strs("Demos", prompts=self.prompts, completions=self.completions)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclasses.dataclass(frozen=True)
class Prefs:
    """Preference pairs: for prompts[i], chosen[i] is preferred to rejected[i]."""

    prompts: tuple[str, ...]
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]

    def __post_init__(self):
        _check_strs("Prefs", prompts=self.prompts, chosen=self.chosen, rejected=self.rejected)

    def __len__(self) -> int:
        return len(self.prompts)


class RecordsDigest(NamedTuple):
    """sha256 of a data set's records and the (immutable) columns it belongs to."""

    hex: str
    columns: tuple  # (Corpus, Demos, Prefs) objects, compared by identity


@dataclasses.dataclass(frozen=True)
class Dataset:
    """The three datasets of one run; ``source`` is the directory or "default".

    ``digest`` is the records' sha256 when the loader already computed it
    (``data.snapshot``), bound to the column objects it was computed on (a copy with
    other records does not reuse it); it never takes part in equality.
    """

    corpus: Corpus
    demos: Demos
    prefs: Prefs
    source: str
    digest: RecordsDigest | None = dataclasses.field(default=None, compare=False, repr=False)


_JSON_TYPE = {dict: "object", list: "array", str: "string", int: "number",
              float: "number", bool: "boolean", type(None): "null"}


def _json_type(value: object) -> str:
    return _JSON_TYPE.get(type(value), type(value).__name__)


class _DuplicateKey(Exception):
    """Raised inside json.loads; turned into a DataError with the line number."""


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # json.loads silently keeps the last of repeated keys; that hides typos.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e


def _check_record(path: Path, lineno: int, obj: object, fields: tuple[str, ...]) -> dict[str, str]:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(obj)}")
    for name in fields:
        if name not in obj:
            raise DataError(f"{where}: field {name!r}: missing (expected fields: {', '.join(fields)})")
        value = obj[name]
        if not isinstance(value, str):
            raise DataError(f"{where}: field {name!r}: expected a string, got {_json_type(value)}")
        if not value.strip():
            kind = "empty string" if not value else "whitespace-only string"
            raise DataError(f"{where}: field {name!r}: {kind}; must be non-empty text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate escape (e.g. "\ud800") is valid JSON but not encodable text.
            raise DataError(f"{where}: field {name!r}: contains an unpaired surrogate escape") from None
    if len(obj) != len(fields):
        extra = next(k for k in obj if k not in fields)
        raise DataError(f"{where}: field {extra!r}: unknown field (expected fields: {', '.join(fields)})")
    return {name: obj[name] for name in fields}


def read_jsonl(path: str | os.PathLike, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Read and validate a JSON Lines file whose records have exactly ``fields``."""
    if (not isinstance(fields, tuple) or not fields or len(set(fields)) != len(fields)
            or not all(isinstance(f, str) and f for f in fields)):
        raise ConfigError(f"fields must be a non-empty tuple of distinct names, got {fields!r}")
    path = Path(path)
    data = _read_bytes(path)
    if data.startswith(_BOM):
        raise DataError(f"{path}:1: file starts with a UTF-8 byte-order mark (BOM); "
                        "save it as UTF-8 without BOM")
    if not data.strip():
        what = _EMPTY_WHAT.get(fields, "an empty file")
        raise DataError(f"{path}: no records ({what})")
    # Decoding the whole file at once is much faster than per line; on failure
    # the byte offset gives the line, which is all per-line decoding would add.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {col} of the line ({e.reason})") from None
    # split("\n") not splitlines(): U+2028 etc. may legally appear inside JSON strings.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    records = []
    for lineno, line in enumerate(lines, start=1):
        if "\x00" in line:
            raise DataError(f"{path}:{lineno}: contains a NUL byte")
        if not line.strip():
            raise DataError(f"{path}:{lineno}: blank line (every line must hold one JSON object)")
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as e:
            raise DataError(f"{path}:{lineno}: field {e.args[0]!r}: appears more than once") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
        except ValueError as e:  # e.g. an integer literal over Python's digit limit
            raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
        except RecursionError:
            raise DataError(f"{path}:{lineno}: invalid JSON: nested too deeply") from None
        records.append(_check_record(path, lineno, obj, fields))
    return records


def _columns(records: list[dict[str, str]], fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [tuple(r[f] for r in records) for f in fields]


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Load corpus.jsonl."""
    (texts,) = _columns(read_jsonl(path, CORPUS_FIELDS), CORPUS_FIELDS)
    return Corpus(texts=texts)


def load_demos(path: str | os.PathLike) -> Demos:
    """Load demos.jsonl."""
    prompts, completions = _columns(read_jsonl(path, DEMO_FIELDS), DEMO_FIELDS)
    return Demos(prompts=prompts, completions=completions)


def load_prefs(path: str | os.PathLike) -> Prefs:
    """Load prefs.jsonl."""
    prompts, chosen, rejected = _columns(read_jsonl(path, PREF_FIELDS), PREF_FIELDS)
    return Prefs(prompts=prompts, chosen=chosen, rejected=rejected)


def load_dataset(directory: str | os.PathLike) -> Dataset:
    """Load corpus.jsonl, demos.jsonl and prefs.jsonl from ``directory``."""
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory")
    return Dataset(
        corpus=load_corpus(directory / CORPUS_FILE),
        demos=load_demos(directory / DEMOS_FILE),
        prefs=load_prefs(directory / PREFS_FILE),
        source=str(directory),
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + os.replace: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write records as UTF-8 JSON Lines (non-ASCII kept as is), atomically."""
    lines = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected a dict, got {type(rec).__name__}")
        try:
            # allow_nan=False: NaN/Infinity are not JSON and other readers reject them.
            line = json.dumps(rec, ensure_ascii=False, allow_nan=False)
            lines.append(line.encode("utf-8"))
        except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
            raise DataError(f"{path}: record {i}: cannot be written as JSON: {e}") from None
    atomic_write_bytes(path, b"".join(line + b"\n" for line in lines))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes (to record exactly which data a run used)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    return h.hexdigest()
