"""utils/bench_data.py: a tiny end-to-end run prints its table with a rate for every pipeline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[1] / "utils" / "bench_data.py"


def test_data_benchmark_prints_a_rate_per_pipeline():
    # Most of its time is the three subprocesses importing open_clip.
    done = subprocess.run([sys.executable, str(SCRIPT), "--images", "16", "--workers", "0",
                           "--batch_size", "4", "--repeats", "1", "--model", "tiny-vit"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \|$", done.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == ["open_clip CsvDataset, full-size JPEGs",
                                             "rankclip CSV, full-size JPEGs", "rankclip shards, 256 px JPEGs"]
    assert all(float(rate) > 0 and float(ratio) > 0 for _, rate, ratio in rows)
    assert "CSV / open_clip:" in done.stdout and "shards@256 / CSV full-size:" in done.stdout
