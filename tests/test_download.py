"""utils/download.py against a local HTTP server: both layouts, failures by reason, resuming,
webdataset shards, and one-line errors for bad input."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from rankclip.config import CsvLayout
from rankclip.csv_index import open_caption_rows

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "utils" / "download.py"
COLOURS = {0: (220, 30, 30), 1: (30, 200, 40), 2: (30, 60, 220)}
TIMEOUT = 1  # --timeout given to the script; /slow/ answers after SLOW_SECONDS
SLOW_SECONDS = 3
# Two shards of three rows, each mixing good and bad rows.
CC3M_ROWS = [
    ("a red square", "/png/0"),
    ("nothing here", "/missing/3"),
    ("a green square", "/jpg/1"),
    ("broken bytes", "/corrupt/4"),
    ('a blue, "quoted" square', "/png/2"),
    ("too slow", "/slow/5"),
]
GOOD = {"a red square": 0, "a green square": 1, 'a blue, "quoted" square': 2}


def load_download() -> ModuleType:
    """utils/download.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("download", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


download = load_download()


def encoded(colour: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), COLOURS[colour]).save(buffer, format=fmt)
    return buffer.getvalue()


class Handler(BaseHTTPRequestHandler):
    """/png/N, /jpg/N: an image of colour N; /missing/: 404; /corrupt/: junk; /slow/: a PNG, late."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        kind, number = self.path.strip("/").split("/")
        if kind == "missing":
            self.send_error(404)
            return
        if kind == "slow":
            time.sleep(SLOW_SECONDS)
        body = {"png": lambda: encoded(int(number), "PNG"), "slow": lambda: encoded(0, "PNG"),
                "jpg": lambda: encoded(int(number), "JPEG"), "corrupt": lambda: b"not an image at all" * 20}[kind]()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg" if kind == "corrupt" else f"image/{kind}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the slow response's client has given up

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.block_on_close = False
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def cc3m_tsv(path: Path, base: str) -> Path:
    return write_tsv(path, [f"{caption}\t{base}{url}" for caption, url in CC3M_ROWS])


def run(*args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    command = [sys.executable, str(SCRIPT), "--processes", "1", "--threads", "2", "--timeout", str(TIMEOUT),
               *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)


def assert_colour(path: Path, colour: int) -> None:
    with Image.open(path) as image:
        pixel = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    assert max(abs(a - b) for a, b in zip(pixel, COLOURS[colour])) < 40, (path, pixel, colour)


@pytest.fixture(scope="module")
def cc3m(server, tmp_path_factory) -> dict:
    """One download of the CC3M-layout TSV in csv format, with shards of 3 rows."""
    root = tmp_path_factory.mktemp("cc3m")
    tsv = cc3m_tsv(root / "cc3m.tsv", server.base)
    out = root / "out"
    seen = len(server.requests)
    result = run("-f", tsv, "-d", out, "--shard_size", 3)
    return {"tsv": tsv, "out": out, "result": result, "requests": server.requests[seen:]}


@pytest.mark.e2e
def test_csv_lists_exactly_the_good_images_with_their_captions(cc3m):
    assert cc3m["result"].returncode == 0, cc3m["result"].stderr
    assert "layout cc3m" in cc3m["result"].stdout
    out = cc3m["out"]
    with open(out / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["caption"] for row in rows) == sorted(GOOD)
    for row in rows:
        assert not Path(row["image"]).is_absolute()
        assert_colour(out / row["image"], GOOD[row["caption"]])
    index = open_caption_rows(out / "train.csv", CsvLayout("image", "caption", ","))
    assert sorted(index.caption(i) for i in range(len(index))) == sorted(GOOD)
    assert all(Path(index.image(i)).is_file() for i in range(len(index)))


@pytest.mark.e2e
def test_every_url_fetched_once_and_failures_counted_by_reason(cc3m):
    assert sorted(cc3m["requests"]) == sorted(url for _, url in CC3M_ROWS)
    stdout = cc3m["result"].stdout
    assert "3 succeeded, 3 failed" in stdout
    for reason in ("HTTP 404: 1", "decode error: 1", "timeout: 1"):
        assert f"download:   {reason}\n" in stdout, stdout


@pytest.mark.e2e
def test_resume_fetches_only_unfinished_shards(cc3m, server):
    out = cc3m["out"]
    (out / "00001_stats.json").unlink()  # as if the run had stopped during the second shard
    seen = len(server.requests)
    again = run("-f", cc3m["tsv"], "-d", out, "--shard_size", 3)
    assert again.returncode == 0, again.stderr
    assert sorted(server.requests[seen:]) == sorted(url for _, url in CC3M_ROWS[3:])
    assert "(1 fetched by this run): 3 succeeded, 3 failed" in again.stdout

    seen = len(server.requests)
    third = run("-f", cc3m["tsv"], "-d", out, "--shard_size", 3)
    assert third.returncode == 0, third.stderr
    assert server.requests[seen:] == []
    assert "2 shards, 2 already complete" in third.stdout and "3 succeeded, 3 failed" in third.stdout
    with open(out / "train.csv", newline="") as f:
        assert sorted(row["caption"] for row in csv.DictReader(f)) == sorted(GOOD)


@pytest.mark.e2e
def test_images_that_do_not_verify_are_left_out_of_train_csv(cc3m, server):
    out = cc3m["out"]
    with open(out / "train.csv", newline="") as f:
        images = {row["caption"]: out / row["image"] for row in csv.DictReader(f)}
    images["a red square"].write_bytes(b"garbage")
    images["a green square"].unlink()
    seen = len(server.requests)
    result = run("-f", cc3m["tsv"], "-d", out, "--shard_size", 3)
    assert result.returncode == 0, result.stderr
    assert server.requests[seen:] == []
    assert "1 succeeded, 5 failed" in result.stdout
    assert "download:   decode error: 2\n" in result.stdout and "download:   image file missing: 1\n" in result.stdout
    with open(out / "train.csv", newline="") as f:
        assert [row["caption"] for row in csv.DictReader(f)] == ['a blue, "quoted" square']


@pytest.mark.e2e
def test_webdataset_shards_hold_the_good_samples_of_a_cc12m_file(server, tmp_path):
    lines = [f"{server.base}/png/0\tred one", f"{server.base}/missing/9\tlost one", f"{server.base}/jpg/2\tblue one"]
    tsv = write_tsv(tmp_path / "cc12m.tsv", lines)
    result = run("-f", tsv, "-d", tmp_path / "wds", "--format", "webdataset")
    assert result.returncode == 0, result.stderr
    assert "layout cc12m" in result.stdout and "download:   HTTP 404: 1\n" in result.stdout
    tars = sorted((tmp_path / "wds").glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar"]
    with tarfile.open(tars[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = {name.rsplit(".", 1)[0] for name in members}
    captions = {members[f"{key}.txt"].decode(): key for key in samples}
    assert sorted(captions) == ["blue one", "red one"]
    for caption, colour in (("red one", 0), ("blue one", 2)):
        jpg = tmp_path / f"{caption}.jpg"
        jpg.write_bytes(members[f"{captions[caption]}.jpg"])
        assert_colour(jpg, colour)
    assert not (tmp_path / "wds" / "train.csv").exists()


def test_layout_detection_and_row_range(tmp_path):
    url = "https://example.org/a.jpg"
    assert download.detect_layout(["a caption", url], 1) == "cc3m"
    assert download.detect_layout([url, "a caption"], 1) == "cc12m"
    with pytest.raises(download.InputError, match="line 4: cannot tell the layout, neither column"):
        download.detect_layout(["a caption", "another"], 4)
    tsv = write_tsv(tmp_path / "rows.tsv", [f"caption {i}\t{url}?{i}" for i in range(5)])
    layout, count = download.convert_rows(tsv, 1, 3, None, tmp_path / "rows.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert (layout, count) == ("cc3m", 2)
    assert rows == [{"caption": "caption 1", "url": f"{url}?1"}, {"caption": "caption 2", "url": f"{url}?2"}]


def test_failure_reasons_group_messages_by_cause():
    reason = download.failure_reason
    assert reason("failed_to_download", "HTTP Error 503: Service Unavailable") == "HTTP 503"
    assert reason("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert reason("failed_to_download", "<urlopen error [Errno -2] Name or service not known>") == "DNS lookup failed"
    assert reason("failed_to_download", "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] ...>") == "SSL error"
    assert reason("failed_to_resize", "Image decoding error") == "decode error"
    assert reason("failed_to_download", "Remote end closed connection\nmore") == "Remote end closed connection"


@pytest.mark.parametrize("case, expected", [
    ("columns", "line 3 has 3 tab-separated columns, expected 2"),
    ("utf8", "line 2: not valid UTF-8"),
    ("empty", "line 2 is empty"),
    ("layout", "line 1: column 1 is not an http(s) URL (layout cc12m"),
    ("out_is_file", "is a file, not a folder"),
    ("end_before_start", "-e 2 must be greater than -s 4"),
    ("start_past_end", "has only 3 rows"),
    ("other_selection", "holds another download (end 6 then, 2 now)"),
])
@pytest.mark.e2e
def test_bad_input_is_one_line_before_any_download(case, expected, server, tmp_path, cc3m):
    good = f"a caption\t{server.base}/png/0"
    tsv, out, extra = tmp_path / "in.tsv", tmp_path / "out", []
    lines = {"columns": [good, good, f"{good}\textra"], "empty": [good, "", good], "layout": [good]}
    write_tsv(tsv, lines.get(case, [good] * 3))
    if case == "utf8":
        tsv.write_bytes(f"{good}\n".encode() + b"caf\xe9\t" + f"{server.base}/png/1\n".encode())
    elif case == "layout":
        extra = ["--layout", "cc12m"]
    elif case == "out_is_file":
        out.write_text("not a folder")
    elif case == "end_before_start":
        extra = ["-s", 4, "-e", 2]
    elif case == "start_past_end":
        extra = ["-s", 3]
    elif case == "other_selection":
        tsv, out, extra = cc3m["tsv"], cc3m["out"], ["-e", 2, "--shard_size", 3]
    seen = len(server.requests)
    result = run("-f", tsv, "-d", out, *extra)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("download: error: ") and expected in result.stderr, result.stderr
    assert server.requests[seen:] == []
    if case != "other_selection":
        assert not out.is_dir()
