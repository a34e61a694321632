"""Launch-mode errors that must come at start-up, as one line, without a GPU in sight."""

import pytest
import torch

from rankclip.errors import ConfigError
from rankclip.launch import resolve_device
from rankclip.runtime import Runtime
from rankclip.main import main


def test_distributed_without_a_gpu_is_one_line(colour_data, tmp_path, capsys):
    argv = ["--train_data", str(colour_data["train"]), "--model_name", "tiny-vit", "--logs", str(tmp_path),
            "--distributed"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--distributed spawns one process per GPU and no GPU is visible" in err[0]
    assert "torchrun --nproc_per_node" in err[0]


def test_gpu_device_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU is visible; use --device cpu"):
        resolve_device("gpu", 0)
    assert resolve_device(None, 0) == torch.device("cpu")


def test_missing_gpu_index_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="GPU 3 does not exist: 2 GPUs are visible"):
        resolve_device("gpu", 3)
    assert resolve_device("gpu", 1) == torch.device("cuda", 1)


def test_sync_bn_on_cpu_processes_is_refused_before_wrapping():
    runtime = Runtime(rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="--sync_bn synchronizes BatchNorm over GPUs"):
        runtime.wrap(torch.nn.BatchNorm1d(2), sync_bn=True)
