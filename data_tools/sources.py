"""Inputs of `tokenize --input`: files, directories, globs and fsspec URLs of JSONL, Parquet, plain
text and Hugging Face `save_to_disk` Arrow directories; .gz/.zst/.bz2/.xz read transparently.

Each input expands, in a deterministic order, to *units*: one file (or one Arrow file of a
`save_to_disk` directory). A unit is what one worker tokenizes, what a resumed run skips when it
is finished, and what `--num-partitions` distributes.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from mtp_pretrain.data.errors import DataError

COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
TEXT_SUFFIXES = {".txt", ".text", ".md"}
SKIP_NAMES = {".git", "__pycache__"}


@dataclass(frozen=True)
class Unit:
    url: str  # local path or fsspec URL
    format: str  # jsonl | parquet | text | hf_arrow
    compression: str | None
    size: int  # bytes on disk (compressed), the unit of progress

    def to_json(self) -> dict:
        return asdict(self)


def _is_url(src: str) -> bool:
    return "://" in src and not src.startswith("file://")


def _format_of(name: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name, e.g. 'x.jsonl.zst' -> ('jsonl', 'zstd')."""
    suffixes = [s.lower() for s in Path(name.split("?")[0]).suffixes]
    compression = COMPRESSION_SUFFIXES.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl", compression
    if last in PARQUET_SUFFIXES:
        return "parquet", compression
    if last in TEXT_SUFFIXES or compression:
        return "text", compression
    return None, compression


def _hf_arrow_units(directory: Path) -> list[Unit]:
    """The Arrow files of a `datasets` save_to_disk directory, in its state.json order."""
    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{directory}: a DatasetDict; pass one split's directory, e.g. "
                        f"{directory / (splits[0] if splits else 'train')} (splits: {splits})")
    state = json.loads((directory / "state.json").read_text())
    files = [directory / f["filename"] for f in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise DataError(f"{directory / 'state.json'}: lists no Arrow files, or missing ones: {missing[:3]}")
    return [Unit(str(f), "hf_arrow", None, f.stat().st_size) for f in files]


def _file_unit(path: Path, explicit: bool) -> Unit | None:
    fmt, compression = _format_of(path.name)
    if fmt is None:
        if explicit:  # a file named on the command line is text unless it says otherwise
            fmt = "text"
        else:
            return None
    return Unit(str(path), fmt, compression, path.stat().st_size)


def _directory_units(directory: Path) -> list[Unit]:
    if (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file():
        return _hf_arrow_units(directory)
    units = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and (unit := _file_unit(Path(dirpath) / name, explicit=False)):
                units.append(unit)
    return units


def expand_inputs(sources: list[str]) -> list[Unit]:
    """Every unit of every --input, in command-line order, each input's files sorted by path."""
    units: list[Unit] = []
    for src in sources:
        found: list[Unit]
        if _is_url(src):
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(src)
            if any(ch in src for ch in "*?[") and not src.startswith(("http://", "https://")):
                paths = sorted(paths)
            found = []
            for p in paths:
                fmt, compression = _format_of(p)
                url = p if "://" in p else fs.unstrip_protocol(p)
                try:
                    size = int(fs.size(p) or 0)
                except (OSError, FileNotFoundError) as e:
                    raise DataError(f"{src}: cannot reach input: {e}") from e
                found.append(Unit(url, fmt or "text", compression, size))
        elif any(ch in src for ch in "*?["):
            found = []
            for p in sorted(glob.glob(src, recursive=True)):
                path = Path(p)
                found += _directory_units(path) if path.is_dir() else [u for u in [_file_unit(path, False)] if u]
        else:
            path = Path(src)
            if not path.exists():
                raise DataError(f"{src}: input does not exist")
            found = _directory_units(path) if path.is_dir() else [_file_unit(path, explicit=True)]
        if not found:
            raise DataError(f"{src}: no input files found (JSONL, Parquet, text, .gz/.zst/.bz2/.xz, or a "
                            "save_to_disk directory)")
        units += found
    return units


class _CountingReader(io.RawIOBase):
    """Passes reads through and reports the bytes read from the underlying (compressed) file."""

    def __init__(self, raw, report: Callable[[int], None]):
        self.raw, self.report = raw, report

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        if n:
            self.report(n)
        return n


def _open_binary(unit: Unit, report: Callable[[int], None]):
    import fsspec
    from fsspec.compression import compr

    raw = fsspec.open(unit.url, "rb").open()
    counted = io.BufferedReader(_CountingReader(raw, report), buffer_size=1 << 20)
    return compr[unit.compression](counted, mode="rb") if unit.compression else counted


def _iter_parquet(unit: Unit, text_field: str, report: Callable[[int], None]) -> Iterator[str]:
    """Parquet is read by seeking (footer, then column chunks): progress advances by row group."""
    import fsspec
    import pyarrow.parquet as pq

    if unit.compression:
        raise DataError(f"{unit.url}: a compressed Parquet file cannot be read in place; Parquet compresses its "
                        "own columns, store it uncompressed")
    with fsspec.open(unit.url, "rb") as f:
        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{unit.url}: no column {text_field!r} (columns: {pf.schema_arrow.names}); pass --text-field")
        rows = max(pf.metadata.num_rows, 1)
        for g in range(pf.num_row_groups):
            for batch in pf.iter_batches(columns=[text_field], row_groups=[g]):
                yield from (t for t in batch.column(0).to_pylist() if t)
            report(unit.size * pf.metadata.row_group(g).num_rows // rows)


def iter_texts(unit: Unit, text_field: str, report: Callable[[int], None] = lambda n: None) -> Iterator[str]:
    """The documents of one unit, in file order; ``report(n)`` after n more input bytes are read."""
    if unit.format == "hf_arrow":
        import pyarrow as pa

        with pa.memory_map(unit.url, "r") as source:
            reader = pa.ipc.open_stream(source)
            if text_field not in reader.schema.names:
                raise DataError(f"{unit.url}: no column {text_field!r} (columns: {reader.schema.names}); pass --text-field")
            done = 0
            for batch in reader:
                yield from (t for t in batch.column(text_field).to_pylist() if t)
                pos = source.tell()
                report(pos - done)
                done = pos
        return
    if unit.format == "parquet":
        yield from _iter_parquet(unit, text_field, report)
        return
    with _open_binary(unit, report) as f:
        if unit.format == "jsonl":
            for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{unit.url}:{lineno}: not a JSON line ({e})") from e
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{unit.url}:{lineno}: no field {text_field!r} (has {keys}); pass --text-field")
                if record[text_field]:
                    yield record[text_field]
        else:  # plain text: the whole file is one document
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{unit.url}: not UTF-8 text ({e})") from e
            if text.strip():
                yield text
