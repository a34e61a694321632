"""Benchmark: the caption-CSV row index against list-based loaders, at CC3M / CC12M row counts.

For each --rows it writes a CSV of image paths and captions (no images, except the first few
that the start-up check looks for) and measures, each loader in fresh processes:
- first launch: the time to parse the CSV into the loader's rows (for the index, building its cache);
- cached start-up: a second launch's time (the index maps its cache; the others parse again);
- index bytes per row and Python objects per row (`sys.getallocatedblocks()` growth / rows);
- each forked worker's private memory growth (Private_* of /proc/self/smaps_rollup) after it
  reads its share of the rows (every --workers-th row, path and caption, as a data-loader
  worker's batches cover an epoch), without opening images.

Loaders: rankclip's index (`rankclip.csv_index`), the list-based loader this project had before
it (pandas, then a list of joined path strings and a list of captions), and open_clip's
`open_clip_train.data.CsvDataset`. Prints a Markdown table.

    OMP_NUM_THREADS=1 python utils/bench_csv_index.py --rows 30000 3000000
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's rankclip

LOADERS = ("rankclip index", "list-based (before)", "open_clip CsvDataset")
WORDS = ("a", "photo", "of", "the", "dog", "cat", "on", "beach", "red", "car", "street", "at", "night", "with",
         "people", "mountain", "view", "old", "house", "tree", "river", "sunset", "city", "woman", "man")


def write_csv(folder: Path, rows: int, seed: int = 0) -> Path:
    """A CSV of `rows` relative image paths and captions (some with commas and quotes); the first 16
    images exist as empty files so that the start-up check passes."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(16):
        (folder / "images" / f"{i:08d}.jpg").touch()
    path = folder / "captions.csv"
    with open(path, "w") as f:
        f.write("filepath,title\n")
        for i in range(rows):
            caption = " ".join(rng.choices(WORDS, k=rng.randint(5, 18)))
            if i % 7 == 0:
                caption = f'"{caption}, ""quoted"" part"'
            f.write(f"images/{i:08d}.jpg,{caption}\n")
    return path


def private_kib() -> int:
    """This process's private memory (clean + dirty), KiB."""
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_"))


def load(loader: str, csv: Path):
    """(row count, read(i) -> (path, caption), index bytes) for one loader."""
    if loader == "rankclip index":
        from rankclip.config import CsvLayout
        from rankclip.csv_index import open_caption_rows
        rows = open_caption_rows(csv, CsvLayout("filepath", "title", ","))
        size = sum(a.nbytes for a in rows.buffers.arrays())
        return len(rows), lambda i: (rows.image(i), rows.caption(i)), size
    if loader == "list-based (before)":
        import pandas as pd
        frame = pd.read_csv(csv, sep=",", dtype=str, keep_default_na=False, quoting=0)
        root = csv.resolve().parent
        images, captions = [str(root / p) for p in frame["filepath"].tolist()], frame["title"].tolist()
        del frame
    else:
        from open_clip_train.data import CsvDataset
        dataset = CsvDataset(str(csv), None, "filepath", "title", sep=",")
        images, captions = dataset.images, dataset.captions
    size = sys.getsizeof(images) + sys.getsizeof(captions) + sum(map(sys.getsizeof, images)) + sum(
        map(sys.getsizeof, captions))
    return len(images), lambda i: (str(images[i]), str(captions[i])), size


def worker_growth(read, rows: int, workers: int) -> list[float]:
    """Fork `workers` processes that each read every workers-th row; their private memory growth, MiB."""
    children = []
    for w in range(workers):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            before = private_kib()
            for i in range(w, rows, workers):
                read(i)
            os.write(wfd, str(private_kib() - before).encode())
            os._exit(0)
        os.close(wfd)
        children.append((pid, r))
    growth = []
    for pid, r in children:
        with os.fdopen(r) as f:
            growth.append(int(f.read()) / 1024)
        os.waitpid(pid, 0)
    return growth


def measure(loader: str, csv: Path, workers: int) -> dict:
    """One launch of `loader` in this process (its modules imported first: neither time nor objects count them)."""
    import pandas  # noqa: F401
    import rankclip.csv_index  # noqa: F401
    if loader == "open_clip CsvDataset":
        import open_clip_train.data  # noqa: F401
    gc.collect()
    blocks = sys.getallocatedblocks()
    start = time.perf_counter()
    rows, read, size = load(loader, csv)
    seconds = time.perf_counter() - start
    gc.collect()
    objects = (sys.getallocatedblocks() - blocks) / rows
    return {"seconds": seconds, "bytes_per_row": size / rows, "objects_per_row": objects,
            "worker_mib": worker_growth(read, rows, workers) if workers else []}


def launch(loader: str, csv: Path, workers: int) -> dict:
    """`measure` in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--measure", loader, "--csv", str(csv), "--workers",
                          str(workers)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{loader} on {csv} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[30_000, 3_000_000, 12_000_000],
                        help="CSV sizes to measure (default: 30000 3000000 12000000)")
    parser.add_argument("--workers", type=int, default=4, help="forked workers reading the rows (default 4)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where the CSVs go (default: a temporary folder, removed afterwards)")
    parser.add_argument("--measure", choices=LOADERS, help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.csv, args.workers)))
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        print("| rows | loader | first launch (s) | cached start-up (s) | index bytes/row | Python objects/row "
              "| worker private growth (MiB, max of {}) |".format(args.workers))
        print("|---|---|---|---|---|---|---|")
        for rows in args.rows:
            csv = write_csv(Path(tmp) / str(rows), rows)
            for loader in LOADERS:
                first = launch(loader, csv, 0)
                second = launch(loader, csv, args.workers)
                print(f"| {rows:,} | {loader} | {first['seconds']:.2f} | {second['seconds']:.2f} | "
                      f"{second['bytes_per_row']:.0f} | {second['objects_per_row']:.3f} | "
                      f"{max(second['worker_mib']):.1f} |", flush=True)
            for leftover in csv.parent.iterdir():
                if leftover.is_file():
                    leftover.unlink()


if __name__ == "__main__":
    main()
