"""Reading scoring data with Ray Data: NSMC's TSV, CSV, JSONL and Parquet, every row accounted for.

Formats (chosen by extension, or ``format=``):

* ``tsv`` (``.txt``, ``.tsv``): NSMC's own files, a header line (``id  document  label``) then one
  tab-separated row per line, no quoting (reviews contain quote marks);
* ``csv`` (``.csv``): a header row, RFC 4180 quoting (a field may span lines);
* ``jsonl`` (``.jsonl``, ``.json``, ``.ndjson``): one JSON object per line;
* ``parquet`` (``.parquet``, ``.pq``).

Text formats are read as bytes (``ray.data.read_binary_files``) and parsed row by row in a Ray Data
``flat_map``, so that a bad row is not a failed read: a line with the wrong number of fields, bad JSON
or bytes that are not UTF-8 comes back as a :class:`Row` with ``error_kind`` set (``unreadable`` or
``undecodable``), and the job writes it as an error row. Blank lines are not rows. Local files are read on the
driver's node (the only node sure to have them) and handed to Ray Data, so a job on a multi-node cluster
reads the files it was given; ``s3://`` and other URIs are read by Ray Data tasks wherever they run.

Rows are numbered (``row_id``, from 0) in file order, files in the order given (a folder's files sorted
by name): the same input always gives the same numbering, which is what a resumed job relies on.
A column mapping (task field -> column of the file) renames columns for tasks written against other
schemas.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hubkit.errors import DataError

Format = Literal["tsv", "csv", "jsonl", "parquet"]

#: Labelled NSMC samples shipped with hubkit (NSMC v1.0, CC0 1.0; id, document, label): 200 reviews of
#: ratings_test.txt and 200 of ratings_train.txt. ``hubkit quickstart`` scores the first with few-shot
#: examples from the second, so the main job needs no download.
NSMC_SAMPLE_TEST = Path(__file__).resolve().parent / "assets" / "data" / "nsmc_test_200.txt"
NSMC_SAMPLE_TRAIN = NSMC_SAMPLE_TEST.with_name("nsmc_train_200.txt")

_EXTENSIONS: dict[str, Format] = {
    ".txt": "tsv",
    ".tsv": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
FORMATS: tuple[Format, ...] = ("tsv", "csv", "jsonl", "parquet")
# Ray Data tasks ask for a fraction of a CPU: reading must never wait behind engine actors that hold
# whole CPUs, and parsing a file is light.
_TASK_CPUS = 0.25


@dataclass(frozen=True, kw_only=True)
class Row:
    """One input row.

    Attributes:
        row_id: Position in the input, from 0 (files in order, then lines).
        record: Field name -> value, after the column mapping.
        source: ``file:line`` (text formats) or ``file:#index`` (Parquet), for error messages.
        error_kind: Set when the row could not be read (``unreadable`` / ``undecodable``).
        error: One line saying what is wrong with the row.
    """

    row_id: int
    record: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    error_kind: str | None = None
    error: str | None = None


def detect_format(path: str | os.PathLike[str]) -> Format:
    """The format a file's extension implies; raises DataError naming ``--format`` otherwise."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    raise DataError(
        f"cannot tell the format of {path} from its extension; pass --format with one of {', '.join(FORMATS)}"
    )


def parse_columns(value: str | Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """``"document=review,label=sentiment"`` (or a mapping, or a list of ``a=b``) -> {task field: column}."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else [p for v in value for p in str(v).split(",")]
    out: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise DataError(f"--columns takes task_field=column pairs like document=review, got {item!r}")
        out[key.strip()] = column.strip()
    return out


def list_files(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """Files to read, in order: each path as given, a folder's data files sorted by name.

    Raises:
        DataError: a local path that does not exist or a folder without data files.
    """
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not items:
        raise DataError("no data given; pass --data FILE (NSMC .txt/.tsv, .csv, .jsonl or .parquet)")
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        if "://" in text and not text.startswith("local://"):
            out.append(text)  # remote storage: Ray Data lists and reads it
            continue
        path = Path(text.removeprefix("local://")).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS)
            if not files:
                raise DataError(f"folder {path} has no data files ({', '.join(sorted(_EXTENSIONS))})")
            out += [str(p.resolve()) for p in files]
        elif path.is_file():
            out.append(str(path.resolve()))
        else:
            raise DataError(
                f"data file {text} does not exist; check the path (relative paths start at {os.getcwd()})"
            )
    return out


def read_rows(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    format: Format | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> list[Row]:
    """Reads every row of ``paths`` with Ray Data (connecting to Ray if needed), in input order.

    Args:
        paths: Files, folders or URIs.
        format: One of FORMATS; by default from each file's extension.
        columns: Task field -> column in the files.
        limit: Keep only the first ``limit`` rows.

    Returns:
        One Row per data row, unreadable rows included (with ``error_kind`` set).

    Raises:
        DataError: a missing file, an unknown format, or a mapped column that no row has.
    """
    files = list_files(paths)
    formats = {f: (format or detect_format(f)) for f in files}
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    raw = _read_with_ray(files, formats)
    order = {f: i for i, f in enumerate(files)}
    raw.sort(key=lambda r: (order.get(r["file"], len(order)), r["file"], r["line"]))
    if limit is not None:
        raw = raw[: max(0, limit)]
    rows = [_to_row(i, r) for i, r in enumerate(raw)]
    return apply_columns(rows, columns or {}, files)


def read_local_rows(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    format: Format | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
) -> list[Row]:
    """Reads local files in this process, without Ray: the same rows, numbering and error rows as `read_rows`.

    For jobs that run on one machine anyway (``hubkit tune``), where starting a Ray runtime would only cost
    time and memory.

    Raises:
        DataError: a missing file, a remote URI, an unknown format, or a mapped column that no row has.
    """
    files = list_files(paths)
    if format is not None and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}")
    raw: list[dict[str, Any]] = []
    for f in files:
        if "://" in f:
            raise DataError(f"{f} is not a local file; copy it to this machine first")
        fmt = format or detect_format(f)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            raw += [_parquet_row(item, f, i) for i, item in enumerate(pq.read_table(f).to_pylist())]
        else:
            raw += list(_parse_text(Path(f).read_bytes(), fmt, f))
    if limit is not None:
        raw = raw[: max(0, limit)]
    rows = [_to_row(i, r) for i, r in enumerate(raw)]
    return apply_columns(rows, columns or {}, files)


def apply_columns(rows: list[Row], columns: Mapping[str, str], files: Sequence[str] = ()) -> list[Row]:
    """Renames columns (task field -> column); raises DataError if no row has a mapped column."""
    if not columns:
        return rows
    seen: set[str] = set()
    for row in rows:
        seen.update(row.record)
    readable = [r for r in rows if r.error_kind is None]
    missing = [col for col in columns.values() if col not in seen]
    if missing and readable:
        where = ", ".join(Path(f).name for f in files) or "the data"
        raise DataError(
            f"column(s) {missing} are not in {where} (its columns: {', '.join(sorted(seen))}); fix --columns"
        )
    out = []
    for row in rows:
        record = dict(row.record)
        for task_field, column in columns.items():
            if column in row.record:
                record[task_field] = row.record[column]
        out.append(
            Row(
                row_id=row.row_id,
                record=record,
                source=row.source,
                error_kind=row.error_kind,
                error=row.error,
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Ray Data
# ----------------------------------------------------------------------------------------------------


def _read_with_ray(files: list[str], formats: Mapping[str, Format]) -> list[dict[str, Any]]:
    import ray.data  # noqa: F401  (importing it sets up its loggers, which _quiet_ray_data adjusts)

    from hubkit.pool import connect

    connect()  # the job's Ray (idempotent): $RAY_ADDRESS, or a local Ray
    with _quiet_ray_data():
        return _read_blocks(files, formats)


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    # Ray Data prints a line per dataset execution (and a note that progress bars are off) to the console;
    # a scoring job has its own progress bar. Its log file under the Ray session keeps everything.
    handlers = [
        h
        for h in logging.getLogger("ray.data").handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels, strict=True):
            h.setLevel(level)


def _read_blocks(files: list[str], formats: Mapping[str, Format]) -> list[dict[str, Any]]:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True  # Parquet rows are numbered in the order they arrive

    out: list[dict[str, Any]] = []
    text_files = [f for f in files if formats[f] != "parquet"]
    if text_files:
        local = [f for f in text_files if "://" not in f]
        remote = [f for f in text_files if "://" in f]
        parts = []
        if local:
            # The driver's files exist on the driver's node only: hand their bytes to Ray Data from here
            # (other nodes could not open the path), then parse on any node.
            parts.append(ray.data.from_items([{"path": f, "bytes": Path(f).read_bytes()} for f in local]))
        if remote:
            parts.append(ray.data.read_binary_files(remote, include_paths=True, num_cpus=_TASK_CPUS))
        ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
        fmt_of = {f: formats[f] for f in text_files}

        def parse(item: dict[str, Any]) -> list[dict[str, Any]]:
            file = _match(str(item["path"]), fmt_of)
            return list(_parse_text(bytes(item["bytes"]), fmt_of[file], file))

        out += ds.flat_map(parse, num_cpus=_TASK_CPUS).take_all()
    for f in (f for f in files if formats[f] == "parquet"):
        if "://" in f:
            ds = ray.data.read_parquet(f, num_cpus=_TASK_CPUS)
        else:
            import pyarrow.parquet as pq

            ds = ray.data.from_arrow(pq.read_table(f))
        # One file at a time, rows in order (preserve_order): a row's position in its file is its line.
        out += [_parquet_row(item, f, i) for i, item in enumerate(ds.iter_rows())]
    return out


def _match(path: str, files: Mapping[str, Any]) -> str:
    if path in files:
        return path
    for f in files:  # a remote read reports the path without its scheme
        if f.split("://", 1)[-1] == path or path.endswith(f.split("://", 1)[-1]):
            return f
    raise DataError(f"Ray Data returned an unexpected path {path!r}")


# ----------------------------------------------------------------------------------------------------
# Parsing (pure functions: run inside Ray Data tasks, tested directly)
# ----------------------------------------------------------------------------------------------------


def _raw(
    file: str, line: int, record: Mapping[str, Any] | None, kind: str = "", error: str = ""
) -> dict[str, Any]:
    # One schema for every row of every format: the record travels as JSON so rows of different shapes
    # (JSONL) share a block.
    return {
        "file": file,
        "line": line,
        "record": json.dumps(record or {}, ensure_ascii=False, default=str),
        "error_kind": kind,
        "error": error,
    }


def _to_row(row_id: int, raw: Mapping[str, Any]) -> Row:
    name = Path(str(raw["file"])).name
    line = raw["line"]
    source = f"{name}:#{line}" if str(raw["file"]).endswith((".parquet", ".pq")) else f"{name}:{line}"
    return Row(
        row_id=row_id,
        record=json.loads(raw["record"]),
        source=source,
        error_kind=raw["error_kind"] or None,
        error=raw["error"] or None,
    )


def _decode(data: bytes) -> tuple[str, str | None]:
    """Text of ``data`` and, when it is not valid UTF-8, a one-line description of the first bad byte."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        return data.decode("utf-8", errors="replace"), (
            f"bytes that are not UTF-8 (0x{bad} at byte {exc.start}); re-save the file as UTF-8"
        )


def _parse_text(data: bytes, fmt: Format, file: str) -> Iterator[dict[str, Any]]:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the header
    if fmt == "csv":
        yield from _parse_csv(data, file)
        return
    header: list[str] | None = None
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        raw_line = raw_line.removesuffix(b"\r")
        if not raw_line.strip():
            continue
        text, bad = _decode(raw_line)
        if fmt == "jsonl":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                kind, error = ("undecodable", bad) if bad else ("unreadable", f"not JSON ({exc.msg})")
                yield _raw(file, number, None, kind, error)
                continue
            if not isinstance(value, dict):
                yield _raw(file, number, None, "unreadable", "not a JSON object")
                continue
            yield _raw(file, number, value, "undecodable" if bad else "", bad or "")
            continue
        fields = text.split("\t")
        if header is None:
            header = [h.strip() for h in fields]
            continue
        record = dict(zip(header, fields, strict=False))
        if bad:
            yield _raw(file, number, record, "undecodable", bad)
        elif len(fields) != len(header):
            problem = f"{len(fields)} tab-separated fields where the header has {len(header)}"
            yield _raw(file, number, record, "unreadable", problem)
        else:
            yield _raw(file, number, record)


def _parse_csv(data: bytes, file: str) -> Iterator[dict[str, Any]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so they can be found per row.
    text = data.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield _raw(file, reader.line_num, None, "unreadable", f"not CSV ({exc})")
            continue
        number = reader.line_num
        if not fields or not any(f.strip() for f in fields):
            continue
        bad = None
        clean = []
        for f in fields:
            if any("\udc80" <= ch <= "\udcff" for ch in f):
                raw_bytes = f.encode("utf-8", errors="surrogateescape")
                f, bad = _decode(raw_bytes)
            clean.append(f)
        if header is None:
            header = [h.strip() for h in clean]
            continue
        record = dict(zip(header, clean, strict=False))
        if bad:
            yield _raw(file, number, record, "undecodable", bad)
        elif len(clean) != len(header):
            yield _raw(
                file, number, record, "unreadable", f"{len(clean)} fields where the header has {len(header)}"
            )
        else:
            yield _raw(file, number, record)


def _parquet_row(item: Mapping[str, Any], file: str, index: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    bad = None
    for key, value in item.items():
        if isinstance(value, bytes | bytearray):
            value, problem = _decode(bytes(value))
            bad = bad or (f"column {key!r}: {problem}" if problem else None)
        elif hasattr(value, "tolist"):  # numpy scalars and arrays
            value = value.tolist()
        record[key] = value
    if bad:
        return _raw(file, index, record, "undecodable", bad)
    return _raw(file, index, record)


__all__ = [
    "FORMATS",
    "Row",
    "apply_columns",
    "detect_format",
    "list_files",
    "parse_columns",
    "read_local_rows",
    "read_rows",
]
