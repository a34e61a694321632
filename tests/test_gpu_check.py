"""utils/gpu_check.sh: refused without a GPU, and its whole pipeline works as a CPU smoke run."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "utils" / "gpu_check.sh"


def run_script(tmp_path: Path, **settings: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", WORK=str(tmp_path), **settings)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_how_to_smoke_test(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("gpu_check: no CUDA GPU is visible; for a CPU smoke run set "
                                     "DEVICE=cpu GPUS=1 MODEL=tiny-vit")


def test_odd_step_count_is_refused(tmp_path):
    result = run_script(tmp_path, DEVICE="cpu", STEPS="3")
    assert result.returncode == 2 and "STEPS must be an even number" in result.stderr


@pytest.mark.e2e
def test_cpu_smoke_run_prints_a_row_per_objective(tmp_path):
    result = run_script(tmp_path, DEVICE="cpu", GPUS="1", MODEL="tiny-vit", BATCH_PER_GPU="8", STEPS="2",
                        WORKERS="0", BENCH_MODEL="tiny-vit", BENCH_STEPS="6", BENCH_PAIRS="1")
    assert result.returncode == 0, result.stdout + result.stderr
    # utils/bench_train.py: one round of the three trainers with their ratios, then evaluation time
    bench = re.findall(r"^\| 1 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", result.stdout,
                       flags=re.MULTILINE)
    assert len(bench) == 1 and all(float(value) > 0 for value in bench[0]), result.stdout
    assert re.search(r"^clip / open_clip: median [\d.]+", result.stdout, flags=re.MULTILINE)
    assert re.search(r"^\| 1 \| [\d.]+ \|$", result.stdout, flags=re.MULTILINE)  # evaluation seconds, 1 process
    rows = re.findall(r"^\| (clip|rankclip) \| (\d+) \| (\d+) \| - \|$", result.stdout, flags=re.MULTILINE)
    assert [row[0] for row in rows] == ["clip", "rankclip"]
    assert all(int(per_process) > 0 and per_process == overall for _, per_process, overall in rows)
    # one epoch holds STEPS/2 global batches: the second (timed) epoch ends at step 2
    log = (tmp_path / "logs" / "rankclip" / "output.log").read_text()
    assert "epoch 2 train:" in log and "step 2" in log
