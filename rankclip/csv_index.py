"""A caption CSV's rows as a compact, memory-mapped index, parsed once and cached on disk.

Image paths (relative, as written in the CSV) and captions live in two flat UTF-8 byte buffers
with int64 offsets: no Python object per row, so data-loader workers forked from a process that
holds the index never copy it (reading a row changes no refcount on its pages). The first launch
parses the CSV with pandas, chunk by chunk, and writes the buffers to a cache file; later
launches, every rank of every node, memory-map that file, so its pages are shared by all
processes of a node. One process per node builds it (a lock file); the others wait and map it.

Cache file: the magic line, a JSON header (format version, the CSV's size, mtime_ns, the image
and caption columns and the delimiter, the row count, buffer lengths, a CRC-32 of the payload),
zero padding to 8 bytes, then the path offsets, caption offsets, path bytes and caption bytes.
A cache whose key differs from the CSV's is rebuilt; one that is truncated or corrupt is rebuilt
with a warning, never trusted. Written through files.atomic_file, so a cache under its name is whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .config import CsvLayout
from .errors import DataError
from .files import atomic_file
from .logger import log

FORMAT_VERSION = 1
MAGIC = b"RANKCLIP-CSV-INDEX\n"
CACHE_SUFFIX = ".rankclip-index"
CHUNK_ROWS = 200_000  # rows parsed at a time: bounds the build's transient Python objects
CRC_BLOCK = 1 << 24  # bytes checksummed at a time
PROBE_ROWS = 16  # rows whose images must include one that exists


@dataclass(frozen=True)
class RowBuffers:
    """Two UTF-8 columns as flat buffers: row i's text is bytes[offsets[i]:offsets[i + 1]]."""

    path_offsets: np.ndarray  # int64 [rows + 1]
    caption_offsets: np.ndarray  # int64 [rows + 1]
    path_bytes: np.ndarray  # uint8
    caption_bytes: np.ndarray  # uint8

    def __len__(self) -> int:
        return len(self.path_offsets) - 1

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The buffers in their order in the cache file."""
        return self.path_offsets, self.caption_offsets, self.path_bytes, self.caption_bytes


class CaptionRows:
    """A caption CSV's rows: `image(i)` is row i's path joined to the CSV's folder (as `str(folder / path)`),
    `caption(i)` its caption; both are decoded from the buffers when read."""

    def __init__(self, root: Path, buffers: RowBuffers) -> None:
        self.root, self.buffers = root, buffers

    def __len__(self) -> int:
        return len(self.buffers)

    def relative_path(self, i: int) -> str:
        """Row i's image path as written in the CSV."""
        b = self.buffers
        return _decode(b.path_bytes, b.path_offsets, i)

    def image(self, i: int) -> str:
        """Row i's image path, absolute (a relative one is taken against the CSV's folder)."""
        return str(self.root / self.relative_path(i))

    def caption(self, i: int) -> str:
        b = self.buffers
        return _decode(b.caption_bytes, b.caption_offsets, i)


def _decode(data: np.ndarray, offsets: np.ndarray, i: int) -> str:
    return data[int(offsets[i]):int(offsets[i + 1])].tobytes().decode("utf-8")


def open_caption_rows(path: str | Path, layout: CsvLayout) -> CaptionRows:
    """The CSV's rows from its cache (built first where missing or stale), checked at start-up:
    the columns exist, there are rows, and one of the first images exists."""
    csv = Path(path).resolve()
    buffers = load_or_build(csv, layout)
    if len(buffers) == 0:
        raise DataError(f"{path}: has a header but no rows; it needs one row per image")
    rows = CaptionRows(csv.parent, buffers)
    probe = [rows.image(i) for i in range(min(PROBE_ROWS, len(rows)))]
    if not any(os.path.exists(p) for p in probe):
        raise DataError(f"{path}: none of the first {len(probe)} images exist (e.g. {probe[0]}); "
                          f"paths are absolute or relative to the CSV's folder")
    return rows


def cache_key(csv: Path, layout: CsvLayout) -> dict:
    """What the cache must match: the CSV's size and mtime, and the flags that select its columns."""
    stat = csv.stat()
    return {"version": FORMAT_VERSION, "csv_size": stat.st_size, "csv_mtime_ns": stat.st_mtime_ns,
            "image_key": layout.image_key, "caption_key": layout.caption_key, "delimiter": layout.delimiter}


def cache_location(csv: Path) -> Path:
    """Beside the CSV where its folder is writable, else under $XDG_CACHE_HOME/rankclip (by default
    ~/.cache/rankclip), named after a hash of the CSV's absolute path."""
    if _can_write(csv.parent):
        return csv.with_name(csv.name + CACHE_SUFFIX)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rankclip"
    digest = hashlib.sha256(str(csv).encode()).hexdigest()[:16]
    return base / f"{csv.name}.{digest}{CACHE_SUFFIX}"


def _can_write(folder: Path) -> bool:
    """Whether this process may create files in `folder` (False on a read-only mount, even for root)."""
    return os.access(folder, os.W_OK)


def load_or_build(csv: Path, layout: CsvLayout) -> RowBuffers:
    """The cached buffers when the cache matches the CSV; otherwise one process (per lock file) parses
    the CSV and writes the cache while the others wait, then all map it. Where no cache can be
    written, the parsed buffers are used from memory (forked workers still share them)."""
    key = cache_key(csv, layout)
    cache = cache_location(csv)
    buffers, _ = read_cache(cache, key)
    if buffers is not None:
        return buffers
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        lock = _lock(cache.with_name(cache.name + ".lock"))
    except OSError as e:
        log.warning(f"{csv}: cannot write a row-index cache at {cache} ({e}); parsing the CSV in every process")
        return parse_csv(csv, layout)
    try:
        buffers, problem = read_cache(cache, key)  # another process may have built it while this one waited
        if buffers is not None:
            return buffers
        if problem is not None:
            log.warning(f"{cache}: {problem}; rebuilding it")
        buffers = parse_csv(csv, layout)
        try:
            write_cache(cache, key, buffers)
        except OSError as e:
            log.warning(f"{csv}: the row-index cache {cache} could not be written ({e}); using the parsed rows")
            return buffers
        elsewhere = "" if cache.parent == csv.parent else " (the CSV's folder is not writable)"
        log.info(f"{csv}: {len(buffers)} rows indexed into {cache}{elsewhere}")
        mapped, _ = read_cache(cache, key)
        return mapped if mapped is not None else buffers
    finally:
        os.close(lock)  # closing the descriptor releases the lock


def _lock(path: Path) -> int:
    """A descriptor of `path` (created if needed) holding an exclusive flock, which waits for any
    other holder: processes of a node that open the same CSV at once build its cache once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        raise
    return fd


def parse_csv(csv: Path, layout: CsvLayout) -> RowBuffers:
    """The two columns as buffers, parsed chunk by chunk the way `pd.read_csv(..., dtype=str,
    keep_default_na=False, quoting=0)` reads them; bad files raise one DataError line."""
    image_key, caption_key, delimiter = layout.image_key, layout.caption_key, layout.delimiter
    flag = f"--delimiter {delimiter!r}"
    columns: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {image_key: [], caption_key: []}
    try:
        with pd.read_csv(csv, sep=delimiter, dtype=str, keep_default_na=False, quoting=0,
                         chunksize=CHUNK_ROWS) as reader:
            for chunk in reader:
                _check_columns(csv, list(chunk.columns), layout)
                for name, parts in columns.items():
                    parts.append(_flatten(chunk[name].to_numpy()))
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{csv}: the file is empty; it needs a header row and one row per image") from e
    except pd.errors.ParserError as e:
        raise DataError(f"{csv}: cannot be parsed with {flag} ({str(e).strip()}); check --delimiter") from e
    path_offsets, path_bytes = _join(columns[image_key])
    caption_offsets, caption_bytes = _join(columns[caption_key])
    return RowBuffers(path_offsets, caption_offsets, path_bytes, caption_bytes)


def _check_columns(csv: Path, columns: list[str], layout: CsvLayout) -> None:
    image_key, caption_key, delimiter = layout.image_key, layout.caption_key, layout.delimiter
    missing = [key for key in (image_key, caption_key) if key not in columns]
    if not missing:
        return
    other = "\t" if delimiter == "," else ","
    if len(columns) == 1 and other in columns[0]:
        raise DataError(f"{csv}: only one column with --delimiter {delimiter!r}, but the header contains "
                          f"{other!r}; pass --delimiter {other!r}" + (" (as $'\\t')" if other == "\t" else ""))
    flags = {image_key: "--image_key", caption_key: "--caption_key"}
    raise DataError(f"{csv}: no column {', '.join(repr(m) for m in missing)} "
                      f"(columns: {', '.join(columns)}); set {' and '.join(flags[m] for m in missing)}")


def _flatten(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A chunk's strings as (byte lengths, concatenated UTF-8 bytes); its Python objects die with it."""
    encoded = [t.encode("utf-8") for t in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return lengths, np.frombuffer(b"".join(encoded), dtype=np.uint8)


def _join(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.concatenate([p[0] for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.concatenate([p[1] for p in parts])


def _header(key: dict, buffers: RowBuffers, crc: int) -> bytes:
    fields = {**key, "rows": len(buffers), "path_bytes": int(buffers.path_bytes.size),
              "caption_bytes": int(buffers.caption_bytes.size), "crc32": crc}
    text = MAGIC + json.dumps(fields, sort_keys=True).encode() + b"\n"
    return text + b"\0" * (-len(text) % 8)


def write_cache(cache: Path, key: dict, buffers: RowBuffers) -> None:
    """Write the cache atomically (`files.atomic_file`): a failed write (a full disk) leaves no file."""
    header = _header(key, buffers, _crc(buffers))
    with atomic_file(cache) as f:
        f.write(header)
        for array in buffers.arrays():
            f.write(array.data)


def read_cache(cache: Path, key: dict) -> tuple[Optional[RowBuffers], Optional[str]]:
    """(the memory-mapped buffers, None) for a valid cache matching `key`; otherwise (None, why it is
    unusable), the reason None when there is no cache or it belongs to another state of the CSV."""
    try:
        size = cache.stat().st_size
        with open(cache, "rb") as f:
            head = f.read(len(MAGIC) + 65536)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"cannot be read ({e})"
    end = head.find(b"\n", len(MAGIC))
    if not head.startswith(MAGIC) or end < 0:
        return None, "not a row-index cache of this project (or a truncated one)"
    try:
        fields = json.loads(head[len(MAGIC):end])
        stored_key = {name: fields[name] for name in key}
        rows, path_size, caption_size, crc = (int(fields[n]) for n in ("rows", "path_bytes", "caption_bytes", "crc32"))
    except (ValueError, KeyError, TypeError):
        return None, "its header is corrupt"
    if stored_key != key:
        return None, None
    start = end + 1 + (-(end + 1) % 8)
    expected = start + 16 * (rows + 1) + path_size + caption_size
    if size != expected:
        return None, f"it holds {size} bytes where its header implies {expected} (truncated?)"
    data = np.memmap(cache, dtype=np.uint8, mode="r").view(np.ndarray)  # plain views: cheaper slicing
    offsets = data[start:start + 16 * (rows + 1)].view(np.int64)
    path_offsets, caption_offsets = offsets[:rows + 1], offsets[rows + 1:]
    body = start + 16 * (rows + 1)
    buffers = RowBuffers(path_offsets, caption_offsets, data[body:body + path_size], data[body + path_size:])
    if _crc(buffers) != crc:
        return None, "its checksum does not match its contents"
    if (path_offsets[0], path_offsets[-1], caption_offsets[0], caption_offsets[-1]) != (0, path_size, 0, caption_size):
        return None, "its offsets do not span its buffers"
    return buffers, None


def _crc(buffers: RowBuffers) -> int:
    crc = 0
    for array in buffers.arrays():
        for start in range(0, array.nbytes, CRC_BLOCK):
            crc = zlib.crc32(array.reshape(-1).view(np.uint8)[start:start + CRC_BLOCK], crc)
    return crc
