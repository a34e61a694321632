"""--pretrained TAG: open_clip's released weights, read from a Hugging Face cache made here in huggingface_hub's
own layout (no network: every socket connection fails the test)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch

from rankclip.config import ModelConfig
from rankclip.errors import ConfigError
from rankclip.main import main
from rankclip.models import build_model

REVISION = "4f1c2b0e8d6a7c3b5e9f0a1d2c3b4a5e6f7d8c9b"  # a commit hash, as refs/main holds one


def write_hub_cache(cache: Path, repo: str, filename: str, state: dict[str, torch.Tensor]) -> Path:
    """`state` as `filename` of Hugging Face repo `repo` in hub cache `cache`, laid out as huggingface_hub writes
    it: the file under blobs/<sha256>, snapshots/<revision>/<filename> linking to it, refs/main naming the
    revision. Returns the blob."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    staged = folder / "blobs" / "staged"
    if filename.endswith(".safetensors"):
        safetensors.torch.save_file(state, str(staged))
    else:
        torch.save(state, staged)
    blob = staged.rename(folder / "blobs" / hashlib.sha256(staged.read_bytes()).hexdigest())
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / filename).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return blob


@pytest.fixture
def no_network(monkeypatch):
    def refuse(self, address):
        raise AssertionError(f"a network connection to {address}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def rn50_state() -> dict[str, torch.Tensor]:
    """A randomly initialised RN50 (OpenAI's architecture, open_clip's RN50-quickgelu) standing in for weights."""
    torch.manual_seed(7)
    return open_clip.create_model("RN50-quickgelu").state_dict()


def assert_same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_a_tag_is_read_from_the_cache_as_the_file_it_names(tmp_path, rn50_state, no_network):
    """RN50 maps to RN50-quickgelu, whose tag yfcc15m open_clip reads from timm/resnet50_clip.yfcc15m."""
    cache = tmp_path / "hub"
    blob = write_hub_cache(cache, "timm/resnet50_clip.yfcc15m", "open_clip_pytorch_model.bin", rn50_state)
    tagged = build_model(ModelConfig(model_name="RN50", pretrained="yfcc15m", cache_dir=str(cache)))
    assert_same_weights(tagged.model, rn50_state)
    from_file = build_model(ModelConfig(model_name="RN50", pretrained=str(blob)))
    assert_same_weights(from_file.model, rn50_state)


@pytest.mark.e2e
def test_pretrained_alone_reads_openai_weights_from_the_cache_under_hf_home(tmp_path, rn50_state):
    """`--pretrained` alone is the tag openai; HF_HOME places the cache, the safetensors file is found too."""
    write_hub_cache(tmp_path / "home" / "hub", "timm/resnet50_clip.openai", "open_clip_model.safetensors", rn50_state)
    reference = tmp_path / "reference.pt"
    torch.save(rn50_state, reference)
    check = ("import sys, torch; from rankclip.config import parse_config; from rankclip.models import build_model; "
             "cfg = parse_config(sys.argv[1:]); model = build_model(cfg.model).model; "
             f"state = torch.load({str(reference)!r}, weights_only=True); "
             "print('same' if all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) else 'different')")
    env = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="0", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", check, "--model_name", "RN50", "--pretrained", "--retrieval_data",
                             str(reference)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "same"


def test_a_tag_not_in_the_cache_names_the_file_and_the_command_that_fetches_it(tmp_path, no_network):
    with pytest.raises(ConfigError, match=r"--pretrained cc12m: open_clip reads these weights of RN50-quickgelu from "
                                          r"open_clip_pytorch_model.bin of the Hugging Face repository "
                                          r"timm/resnet50_clip.cc12m, which the cache .* does not hold; on a machine "
                                          r"with internet run `hf download timm/resnet50_clip.cc12m "
                                          r"open_clip_pytorch_model.bin`"):
        build_model(ModelConfig(model_name="RN50", pretrained="cc12m", cache_dir=str(tmp_path)))


def test_an_unknown_tag_lists_the_model_tags(no_network):
    with pytest.raises(ConfigError, match=r"RN50-quickgelu has no released weights 'laion2b_s34b_b79k' .*its tags: "
                                          r"openai, yfcc15m, cc12m; it is a tag of --model_name ViT-B-32;"):
        build_model(ModelConfig(model_name="RN50", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(ConfigError, match="OpenAI released no weights for tiny-vit; its tags: none;"):
        build_model(ModelConfig(model_name="tiny-vit", pretrained="openai"))
    with pytest.raises(ConfigError, match="--pretrained missing/weights.pt: no such file"):
        build_model(ModelConfig(model_name="tiny-vit", pretrained="missing/weights.pt"))


def test_the_command_line_says_it_in_one_line(tmp_path, colour_data, capsys, no_network):
    argv = ["--model_name", "RN50", "--pretrained", "yfcc15m", "--cache_dir", str(tmp_path / "empty"),
            "--retrieval_data", str(colour_data["validation"]), "--logs", str(tmp_path), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf download timm/resnet50_clip.yfcc15m open_clip_pytorch_model.bin" in err[0], err
