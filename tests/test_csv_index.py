"""The caption CSV's row index: same rows as pandas, the cache's life, and no per-row objects or copies."""

import errno
import gc
import logging
import mmap
import multiprocessing
import os
import sys
from pathlib import Path

import pandas as pd
import pytest

from rankclip import csv_index
from rankclip.config import CsvLayout
from rankclip.csv_index import CACHE_SUFFIX, open_caption_rows
from rankclip.logger import log

LAYOUT = CsvLayout("image", "caption", ",")


@pytest.fixture(autouse=True)
def visible_log(monkeypatch):
    """Let caplog see the project's logger (setup_console_logging turns propagation off)."""
    monkeypatch.setattr(log, "propagate", True)


@pytest.fixture
def counted_parses(monkeypatch) -> list:
    """Every parse of a CSV, recorded."""
    parses, parse = [], csv_index.parse_csv
    monkeypatch.setattr(csv_index, "parse_csv", lambda *args: parses.append(args) or parse(*args))
    return parses


def write_rows(folder: Path, rows: list[tuple[str, str]], name: str = "data.csv") -> Path:
    """A CSV with the given (image, caption) fields written verbatim, and its first image on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").touch()
    path = folder / name
    path.write_text("image,caption\n" + "".join(f"{image},{caption}\n" for image, caption in rows))
    return path


def many_rows(folder: Path, count: int) -> Path:
    return write_rows(folder, [("a.png" if i == 0 else f"images/{i:07d}.jpg", f"\"a photo number {i} of a dog, maybe\"")
                               for i in range(count)])


def read_all(rows) -> list[tuple[str, str]]:
    return [(rows.image(i), rows.caption(i)) for i in range(len(rows))]


def test_rows_read_as_pandas_reads_them_with_paths_joined_to_the_csv_folder(tmp_path):
    csv = write_rows(tmp_path, [("a.png", '"commas, inside"'), ("./sub/b.png", '"a ""quoted"" word"'),
                                ("/abs/c.png", '"two\nlines, and ""more"""'), ("d.png", ""), ("é.png", "café 漢字")])
    frame = pd.read_csv(csv, sep=",", dtype=str, keep_default_na=False, quoting=0)
    expected = [(str(tmp_path / p), c) for p, c in zip(frame["image"].tolist(), frame["caption"].tolist())]
    built = open_caption_rows(csv, LAYOUT)
    cached = open_caption_rows(csv, LAYOUT)
    assert read_all(built) == read_all(cached) == expected
    assert expected[2] == ("/abs/c.png", 'two\nlines, and "more"') and expected[1][0] == str(tmp_path / "sub/b.png")
    assert [cached.relative_path(i) for i in range(5)] == frame["image"].tolist()


def test_chunked_parse_gives_the_whole_file_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(csv_index, "CHUNK_ROWS", 3)
    csv = write_rows(tmp_path, [(f"{i}.png", f'"row {i}, quoted\nline"') for i in range(10)])
    frame = pd.read_csv(csv, sep=",", dtype=str, keep_default_na=False, quoting=0)
    buffers = csv_index.parse_csv(csv, LAYOUT)
    rows = csv_index.CaptionRows(tmp_path, buffers)
    assert [rows.caption(i) for i in range(10)] == frame["caption"].tolist()


def test_the_cache_is_built_once_then_mapped(tmp_path, counted_parses, caplog):
    csv = many_rows(tmp_path, 50)
    with caplog.at_level(logging.INFO, logger="rankclip"):
        first = read_all(open_caption_rows(csv, LAYOUT))
    assert f"50 rows indexed into {csv}{CACHE_SUFFIX}" in caplog.text
    second = open_caption_rows(csv, LAYOUT)
    assert len(counted_parses) == 1 and read_all(second) == first
    assert all(maps_a_file(a) for a in second.buffers.arrays())


def maps_a_file(array) -> bool:
    """Whether the array's memory is a memory-mapped file."""
    while array is not None and not isinstance(array, mmap.mmap):
        array = getattr(array, "base", None)
    return array is not None


def test_the_cache_is_rebuilt_when_the_csv_or_the_flags_change(tmp_path, counted_parses):
    csv = many_rows(tmp_path, 20)
    open_caption_rows(csv, LAYOUT)
    stat = csv.stat()
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched, same size
    open_caption_rows(csv, LAYOUT)
    assert len(counted_parses) == 2
    with open(csv, "a") as f:
        f.write("a.png,an appended row\n")
    os.utime(csv, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # grown, mtime put back
    rows = open_caption_rows(csv, LAYOUT)
    assert len(counted_parses) == 3 and rows.caption(20) == "an appended row"
    swapped = csv_index.load_or_build(csv, CsvLayout("caption", "image", ","))  # other column flags
    assert len(counted_parses) == 4 and csv_index.CaptionRows(tmp_path, swapped).caption(1) == "images/0000001.jpg"
    csv_index.load_or_build(csv, CsvLayout("caption", "image", ","))
    assert len(counted_parses) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "garbage_header", "empty"])
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, counted_parses, caplog, damage):
    csv = many_rows(tmp_path, 30)
    expected = read_all(open_caption_rows(csv, LAYOUT))
    cache = Path(f"{csv}{CACHE_SUFFIX}")
    data = bytearray(cache.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    elif damage == "flip_payload":
        data[-5] ^= 0x20
    elif damage == "garbage_header":
        data[len(csv_index.MAGIC):len(csv_index.MAGIC) + 8] = b"{{{{{{{{"
    else:
        data = bytearray()
    cache.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="rankclip"):
        rows = open_caption_rows(csv, LAYOUT)
    assert read_all(rows) == expected and len(counted_parses) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding it" in warnings[0].getMessage()
    caplog.clear()
    open_caption_rows(csv, LAYOUT)
    assert len(counted_parses) == 2 and not caplog.records  # the rebuilt cache is good


def test_a_failed_write_leaves_no_cache_and_the_parsed_rows_serve(tmp_path, monkeypatch, caplog):
    csv = many_rows(tmp_path, 10)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv_index.os, "fsync", full_disk)
    with caplog.at_level(logging.WARNING, logger="rankclip"):
        rows = open_caption_rows(csv, LAYOUT)
    assert rows.caption(3) == "a photo number 3 of a dog, maybe"
    assert "could not be written" in caplog.text and "No space left" in caplog.text
    assert {p.name for p in tmp_path.iterdir()} == {"a.png", csv.name, f"{csv.name}{CACHE_SUFFIX}.lock"}


def test_a_read_only_folder_puts_the_cache_under_the_cache_directory(tmp_path, monkeypatch, caplog):
    csv = many_rows(tmp_path / "data", 10)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(csv_index, "_can_write", lambda folder: folder != csv.parent)
    with caplog.at_level(logging.INFO, logger="rankclip"):
        rows = open_caption_rows(csv, LAYOUT)
    cached = list((tmp_path / "cache" / "rankclip").glob(f"data.csv.*{CACHE_SUFFIX}"))
    assert len(cached) == 1 and f"indexed into {cached[0]} (the CSV's folder is not writable)" in caplog.text
    assert not list(csv.parent.glob(f"*{CACHE_SUFFIX}*"))
    assert rows.image(2) == str(csv.parent / "images/0000002.jpg")


def _open_slowly(csv: str, out, parses) -> None:
    """Open the CSV's rows in a child process whose parse takes a while (so the two overlap)."""
    parse = csv_index.parse_csv

    def slow_parse(*args):
        parses.put(os.getpid())
        multiprocessing.Event().wait(0.5)
        return parse(*args)

    csv_index.parse_csv = slow_parse
    rows = open_caption_rows(csv, LAYOUT)
    out.put(read_all(rows))


def test_concurrent_launches_build_the_cache_once(tmp_path):
    csv = many_rows(tmp_path, 200)
    context = multiprocessing.get_context("fork")
    out, parses = context.Queue(), context.Queue()
    children = [context.Process(target=_open_slowly, args=(str(csv), out, parses)) for _ in range(2)]
    for child in children:
        child.start()
    results = [out.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]
    assert results[0] == results[1] and len(results[0]) == 200
    assert parses.qsize() == 1


def private_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_"))


def growth_reading_in_a_fork(read, count: int) -> float:
    """A forked child's private memory growth (MiB) from reading rows 0..count-1."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        before = private_kib()
        for i in range(count):
            read(i)
        os.write(w, str(private_kib() - before).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        growth = int(f.read()) / 1024
    os.waitpid(pid, 0)
    return growth


def test_a_forked_worker_reads_every_row_without_copying_the_index(tmp_path):
    count, bound_mib = 200_000, 16
    csv = many_rows(tmp_path, count)
    rows = open_caption_rows(csv, LAYOUT)
    assert growth_reading_in_a_fork(lambda i: (rows.image(i), rows.caption(i)), count) < bound_mib
    frame = pd.read_csv(csv, sep=",", dtype=str, keep_default_na=False, quoting=0)
    images, captions = [str(tmp_path / p) for p in frame["image"]], frame["caption"].tolist()
    del frame
    assert growth_reading_in_a_fork(lambda i: (images[i], captions[i]), count) > bound_mib  # lists are copied


def test_the_index_holds_no_python_object_per_row(tmp_path):
    count = 50_000
    csv = many_rows(tmp_path, count)
    open_caption_rows(csv, LAYOUT)  # build the cache
    gc.collect()
    before = sys.getallocatedblocks()
    rows = open_caption_rows(csv, LAYOUT)
    gc.collect()
    assert (sys.getallocatedblocks() - before) / count < 0.05
    assert len(rows) == count
