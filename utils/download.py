"""Download CC3M / CC12M (any caption-URL TSV) as a training set, with img2dataset.

    python utils/download.py -f Train_GCC-training.tsv -d data/cc3m
    python -m rankclip.main --train_data data/cc3m/train.csv ...

Input
    CC3M's TSV is caption<TAB>url, CC12M's url<TAB>caption, neither with a header. The layout
    is told from the first selected row (the column holding an http(s) URL) unless --layout
    says it. Rows are numbered from 0 (row r is line r+1); -s/-e select rows [START, END).
    Every selected line is checked before anything is downloaded: two columns, valid UTF-8,
    an http(s) URL where the layout puts it; the first bad line stops the run with its number.

Output (img2dataset's layout, images resized so that the shorter side is at most --image_size)
    csv          OUT/<shard>/<key>.jpg (+ .txt, .json) and OUT/train.csv (columns image,caption;
                 paths relative to OUT), which lists only images that downloaded and decode.
    webdataset   OUT/<shard>.tar, a jpg, txt and json per sample.
    Both         OUT/<shard>.parquet (every row's status and error) and OUT/<shard>_stats.json,
                 which img2dataset writes once the shard is complete.

Resuming
    A second run into the same OUT skips every complete shard (img2dataset's incremental mode)
    and fetches only the shards an interrupted run left unfinished; failed images of a complete
    shard are not retried (delete that shard's _stats.json to fetch it again). OUT records the
    options it was made with in download_selection.txt (not .json: img2dataset reads every
    OUT/*.json as a shard's stats), so a run with other rows or another format is refused
    instead of mixing shards that do not belong together.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn, Optional

import pandas as pd
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rankclip.files import atomic_file  # noqa: E402

LAYOUTS = {"cc3m": ("caption", "url"), "cc12m": ("url", "caption")}
FORMATS = {"csv": "files", "webdataset": "webdataset"}  # ours -> img2dataset's output_format
RECORD = "download_selection.txt"
TRAIN_CSV = "train.csv"
OOM_SHARD_COUNT = 5  # digits of a shard name, img2dataset's default
URL = re.compile(r"https?://\S", re.IGNORECASE)  # the start of an http(s) URL
INSTALL_HINT = "pip install -e '.[download]'"


class InputError(Exception):
    """A problem with the command line or the input file: reported in one line, exit code 2."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"download: error: {message}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, like the rest of this script's."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


@dataclass(frozen=True)
class Selection:
    """What OUT holds; a later run into the same OUT must ask for the same."""

    tsv_bytes: int
    start: int
    end: int
    layout: str
    format: str
    image_size: int
    shard_size: int


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = Parser(prog="download", description=__doc__.split("\n")[0])
    parser.add_argument("-f", "--file", type=Path, required=True, help="the TSV of captions and URLs")
    parser.add_argument("-d", "--dir", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("-s", "--start", type=int, default=0, help="first row to download (from 0)")
    parser.add_argument("-e", "--end", type=int, default=None,
                        help="row after the last one to download (default: the end of the file)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), help="force the column order instead of detecting it")
    parser.add_argument("--format", choices=sorted(FORMATS), default="csv",
                        help="csv: image files and train.csv (default); webdataset: tar shards")
    parser.add_argument("--image_size", type=int, default=256,
                        help="shorter side at most this many pixels (default: 256)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="download processes (default: one per CPU)")
    parser.add_argument("--threads", type=int, default=64, help="download threads per process (default: 64)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one image (default: 10)")
    parser.add_argument("--shard_size", type=int, default=10000,
                        help="rows per shard, the unit of resuming and of a webdataset tar (default: 10000)")
    args = parser.parse_args(argv)
    if args.start < 0:
        raise InputError(f"-s {args.start}: the first row is 0")
    if args.end is not None and args.end <= args.start:
        raise InputError(f"-e {args.end} must be greater than -s {args.start}")
    for flag in ("image_size", "processes", "threads", "shard_size"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag} {getattr(args, flag)} must be at least 1")
    if args.timeout <= 0:
        raise InputError(f"--timeout {args.timeout} must be positive")
    return args


def split_line(raw: bytes, number: int) -> list[str]:
    """The tab-separated fields of one line, or an InputError naming the line."""
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"line {number}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from e
    if not text.strip():
        raise InputError(f"line {number} is empty; every line needs a caption and a URL separated by a tab")
    fields = text.split("\t")
    if len(fields) != 2:
        raise InputError(f"line {number} has {len(fields)} tab-separated columns, expected 2 "
                         f"(caption<TAB>url for CC3M, url<TAB>caption for CC12M)")
    return [field.strip() for field in fields]


def detect_layout(fields: list[str], number: int) -> str:
    """cc3m or cc12m, from which of the two columns is a URL."""
    matches = [name for name, columns in LAYOUTS.items() if URL.match(fields[columns.index("url")])]
    if len(matches) != 1:
        which = "both columns are" if matches else "neither column is"
        raise InputError(f"line {number}: cannot tell the layout, {which} an http(s) URL; pass --layout cc3m or cc12m")
    return matches[0]


def convert_rows(tsv: Path, start: int, end: Optional[int], layout: Optional[str], jsonl: Path) -> tuple[str, int]:
    """Check rows [start, end) of the TSV and write them to `jsonl` as img2dataset's input.

    Returns the layout and the number of rows. JSON lines, because every caption stays a string
    whatever it looks like (a CSV reader would make "1984" a number).
    """
    count = total = 0
    with open(tsv, "rb") as lines, open(jsonl, "w", encoding="utf-8") as out:
        for row, raw in enumerate(tqdm(lines, desc="checking rows", unit=" rows", disable=None)):
            total = row + 1
            if end is not None and row >= end:
                break
            if row < start:
                continue
            fields = split_line(raw, row + 1)
            layout = layout or detect_layout(fields, row + 1)
            values = dict(zip(LAYOUTS[layout], fields))
            if not URL.match(values["url"]):
                column = LAYOUTS[layout].index("url") + 1
                raise InputError(f"line {row + 1}: column {column} is not an http(s) URL (layout {layout}: "
                                 f"{'<TAB>'.join(LAYOUTS[layout])}); is --layout right?")
            out.write(json.dumps(values, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        raise InputError(f"-s {start}: {tsv} has only {total} rows")
    return layout, count


def check_output_folder(out: Path, selection: Selection) -> None:
    """Create OUT, or check that it holds a download of the same selection; then record it."""
    record = out / RECORD
    if record.exists():
        try:
            before = json.loads(record.read_text())
        except ValueError as e:
            raise InputError(f"{record} is not the JSON this script writes ({e}); use a new folder") from e
        changed = {k: (before.get(k), v) for k, v in asdict(selection).items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k} {old} then, {new} now" for k, (old, new) in changed.items())
            raise InputError(f"{out} holds another download ({what}); repeat its options or use another folder")
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty and holds no download of this script; use a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(asdict(selection)) + "\n")
    except OSError as e:
        raise InputError(f"cannot write to {out}: {e.strerror}") from e


def shard_name(shard: int) -> str:
    """img2dataset's name for a shard: its number with OOM_SHARD_COUNT digits."""
    return f"{shard:0{OOM_SHARD_COUNT}d}"


def done_shards(out: Path) -> set[int]:
    """Shards img2dataset has finished: it writes <shard>_stats.json last."""
    return {int(p.name.split("_")[0]) for p in out.glob("*_stats.json") if p.name.split("_")[0].isdigit()}


def run_img2dataset(jsonl: Path, out: Path, args: argparse.Namespace) -> None:
    # Imported here: it pulls in torch, wandb and OpenCV (seconds), and input errors should be instant.
    # Albumentations (imported by img2dataset) otherwise asks PyPI for a newer version in every process.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download

    try:
        download(
            url_list=str(jsonl), input_format="jsonl", url_col="url", caption_col="caption",
            output_folder=str(out), output_format=FORMATS[args.format], incremental_mode="incremental",
            image_size=args.image_size, resize_mode="keep_ratio", resize_only_if_bigger=True,
            processes_count=args.processes, thread_count=args.threads, timeout=args.timeout,
            number_sample_per_shard=args.shard_size, oom_shard_count=OOM_SHARD_COUNT,
        )
    except SystemExit:
        # img2dataset's SIGINT handler removes its temporary folder and exits with status 0.
        fail("interrupted; complete shards are kept, run the same command to fetch the rest", 130)


def failure_reason(status: str, message: Optional[str]) -> str:
    """A failure's class for the summary: HTTP 404, timeout, decode error, ... (else the message)."""
    message = (message or status).strip()
    http = re.match(r"HTTP Error (\d+)", message)
    if http:
        return f"HTTP {http.group(1)}"
    lowered = message.lower()
    for needle, reason in (("timed out", "timeout"), ("image decoding error", "decode error"),
                           ("connection refused", "connection refused"), ("connection reset", "connection reset"),
                           ("name or service not known", "DNS lookup failed"),
                           ("name resolution", "DNS lookup failed"), ("ssl", "SSL error"),
                           ("x-robots-tag", "refused by X-Robots-Tag")):
        if needle in lowered:
            return reason
    return message.splitlines()[0][:80]


def image_problem(path: Path) -> Optional[str]:
    """None if PIL opens and verifies the image (img2dataset has decoded its pixels already), else why not."""
    if not path.is_file():
        return "image file missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for a bad file
        return "decode error"
    return None


def collect(out: Path, shards: list[int], verify: bool) -> tuple[list[tuple[str, str]], Counter]:
    """(image path relative to OUT, caption) of every good image of the shards, and failures by reason."""
    good, failures = [], Counter()
    for shard in shards:
        frame = pd.read_parquet(out / f"{shard_name(shard)}.parquet",
                                columns=["key", "caption", "status", "error_message"])
        for key, caption, status, message in frame.sort_values("key").itertuples(index=False):
            if status == "success":
                good.append((f"{shard_name(shard)}/{key}.jpg", caption))
            else:
                failures[failure_reason(status, message)] += 1
    if verify:
        with ThreadPoolExecutor(8) as pool:
            problems = list(tqdm(pool.map(image_problem, (out / image for image, _ in good)), total=len(good),
                                 desc="verifying images", unit=" images", disable=None))
        failures.update(problem for problem in problems if problem)
        good = [row for row, problem in zip(good, problems) if problem is None]
    return good, failures


def write_train_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    """image,caption rows, written to a temporary file and renamed: never a half-written train.csv."""
    with atomic_file(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows(rows)


def prepare(args: argparse.Namespace, out: Path, jsonl: Path) -> Selection:
    """Check the input and OUT, write img2dataset's input; InputError or OSError on the first problem."""
    if importlib.util.find_spec("img2dataset") is None:
        raise InputError(f"img2dataset is not installed: {INSTALL_HINT}")
    if not args.file.is_file():
        raise InputError(f"-f {args.file}: no such file")
    if out.exists() and not out.is_dir():
        raise InputError(f"-d {args.dir} is a file, not a folder")
    layout, rows = convert_rows(args.file, args.start, args.end, args.layout, jsonl)
    selection = Selection(args.file.stat().st_size, args.start, args.start + rows, layout, args.format,
                          args.image_size, args.shard_size)
    check_output_folder(out, selection)
    return selection


def report(out: Path, args: argparse.Namespace, shards: list[int], before: set[int]) -> None:
    """Print the summary, write train.csv (csv format); exit 1 if shards are missing or nothing downloaded."""
    complete = sorted(done_shards(out) & set(shards))
    good, failures = collect(out, complete, verify=args.format == "csv")
    failed = sum(failures.values())
    print(f"download: {len(good) + failed} rows in {len(complete)} complete shards "
          f"({len(set(complete) - before)} fetched by this run): {len(good)} succeeded, {failed} failed")
    for reason, count in failures.most_common():
        print(f"download:   {reason}: {count}")
    if args.format == "csv" and good:
        write_train_csv(out / TRAIN_CSV, good)
        print(f"download: wrote {out / TRAIN_CSV} ({len(good)} images); "
              f"train with: python -m rankclip.main --train_data {out / TRAIN_CSV}")
    unfinished = len(shards) - len(complete)
    if unfinished:
        fail(f"{unfinished} of {len(shards)} shards did not finish (see above); run the same command to fetch them", 1)
    if args.format == "webdataset":
        names = shard_name(0) if len(shards) == 1 else f"{{{shard_name(0)}..{shard_name(shards[-1])}}}"
        print(f"download: tar shards {out}/{names}.tar")
    if not good:
        fail("no image could be downloaded (see the failures above)", 1)


def main(argv: Optional[list[str]] = None) -> None:
    try:
        args = parse_args(argv)
    except InputError as e:
        fail(str(e))
    out = args.dir.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"-d {args.dir}: cannot create the folder {out.parent}: {e.strerror}")
    # img2dataset's input lives beside OUT, not in /tmp: for CC12M it is gigabytes.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-rows-") as tmp:
        jsonl = Path(tmp) / "rows.jsonl"
        try:
            selection = prepare(args, out, jsonl)
        except InputError as e:
            fail(str(e))
        except OSError as e:
            fail(f"{e.filename}: {e.strerror}")
        rows = selection.end - selection.start
        shards = list(range(math.ceil(rows / args.shard_size)))
        before = done_shards(out)
        print(f"download: {rows} rows (lines {selection.start + 1}-{selection.end} of {args.file}, layout "
              f"{selection.layout}) in {len(shards)} shards, {len(before & set(shards))} already complete", flush=True)
        if not set(shards) <= before:
            run_img2dataset(jsonl, out, args)
    report(out, args, shards, before)


if __name__ == "__main__":
    main()
