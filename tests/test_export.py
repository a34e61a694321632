"""rankclip.export writes open_clip's model folder; open_clip itself (a fresh process, which knows nothing of
this project's models) loads it to the same features; --model_name local-dir: takes it back."""

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from rankclip import export as exporting
from rankclip.config import Config, ModelConfig
from rankclip.export import export, main as export_main
from rankclip.losses import model_init
from rankclip.main import main
from rankclip.models import ModelBundle, build_model

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["a photo of a red square", "blue colour"]


def write_checkpoint(run_dir: Path, model_name: str, epoch: int = 2, **settings) -> tuple[Path, ModelBundle]:
    """A checkpoint of this project's layout (randomly initialized weights) in `run_dir`/checkpoints, with a
    results.jsonl beside it; returns its path and the model's bundle."""
    torch.manual_seed(epoch)
    bundle = build_model(ModelConfig(model_name=model_name))
    cfg = Config.from_dict({"model_name": model_name, "train_data": "train.csv", "epochs": 4, **settings})
    path = run_dir / "checkpoints" / f"epoch_{epoch}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": epoch, "name": run_dir.name, "model_name": model_name, "config": cfg.to_dict(),
                "state_dict": bundle.model.state_dict()}, path)
    records = [{"epoch": epoch, "split": "eval", "eval_data_type": "ImageNet1K", "zeroshot_top1": 0.625},
               {"epoch": epoch - 1, "split": "eval", "eval_data_type": "ImageNet1K", "zeroshot_top1": 0.125},
               {"epoch": epoch, "split": "validation", "contrastive_loss": 1.5}]
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, bundle


def features(model: torch.nn.Module, preprocess, tokenizer, image: Image.Image) -> dict[str, list]:
    model.eval()
    with torch.no_grad():
        return {"image": model.encode_image(preprocess(image)[None]).tolist(),
                "text": model.encode_text(tokenizer(CAPTIONS)).tolist()}


FRESH_PROCESS = """
import json, sys
import open_clip
from PIL import Image
model, _, preprocess = open_clip.create_model_and_transforms(sys.argv[1])
tokenizer = open_clip.get_tokenizer(sys.argv[1])
model.eval()
import torch
with torch.no_grad():
    image = model.encode_image(preprocess(Image.open(sys.argv[2]))[None]).tolist()
    text = model.encode_text(tokenizer(json.loads(sys.argv[3]))).tolist()
print(json.dumps({"image": image, "text": text}))
"""


def assert_close(got: dict, want: dict) -> None:
    for key in want:
        assert torch.allclose(torch.tensor(got[key]), torch.tensor(want[key]), rtol=0, atol=1e-6), key


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "picture.png"
    torch.manual_seed(0)
    Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()).save(path)
    return path


def exported_features(out: Path, picture: Path, fresh: bool) -> dict[str, list]:
    """The features of open_clip's own model from folder `out`: built here, or in a fresh process that does not
    import rankclip (so that open_clip knows nothing of this project's models)."""
    if not fresh:
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
        return features(model, preprocess, open_clip.get_tokenizer(f"local-dir:{out}"), Image.open(picture))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [sys.executable, "-c", FRESH_PROCESS, f"local-dir:{out}", str(picture), json.dumps(CAPTIONS)]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout.splitlines()[-1])


@pytest.mark.e2e
@pytest.mark.parametrize("model_name, fresh", [("tiny-vit", True), ("RN50", False)])
def test_open_clip_loads_the_folder_to_the_projects_features(tmp_path, picture, model_name, fresh):
    """open_clip builds the exported folder, and its image and text features equal this project's model's
    (fp32); tiny-vit in a process where open_clip has never heard of it."""
    checkpoint, bundle = write_checkpoint(tmp_path / "run", model_name)
    out = export(checkpoint, tmp_path / "exported")
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors", "README.md"}
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"] == open_clip.get_model_config(bundle.open_clip_name)
    assert set(config["preprocess_cfg"]) >= {"mean", "std"}
    want = features(bundle.model, bundle.val_transform, bundle.tokenizer, Image.open(picture))
    assert_close(exported_features(out, picture, fresh), want)


def test_a_siglip_checkpoint_exports_with_its_logit_bias(tmp_path, picture):
    """A --loss siglip run's weights hold open_clip's logit_bias: the folder's model_cfg asks open_clip for one
    (init_logit_bias, as open_clip's own SigLIP configs do), so the folder loads whole, bias included."""
    torch.manual_seed(0)
    bundle = build_model(ModelConfig(model_name="tiny-vit"), init=model_init("siglip"))
    with torch.no_grad():
        bundle.model.logit_bias.fill_(-7.25)
    cfg = Config.from_dict({"model_name": "tiny-vit", "train_data": "train.csv", "loss": "siglip"})
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "name": "run", "model_name": "tiny-vit", "config": cfg.to_dict(),
                "state_dict": bundle.model.state_dict()}, checkpoint)
    out = export(checkpoint, tmp_path / "exported")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert model.logit_bias.item() == -7.25
    assert "SigLIP" in (out / "README.md").read_text()
    assert_close(features(model, preprocess, open_clip.get_tokenizer(f"local-dir:{out}"), Image.open(picture)),
                 features(bundle.model, bundle.val_transform, bundle.tokenizer, Image.open(picture)))


def test_the_model_card_states_the_objective_model_data_epochs_and_results(tmp_path):
    checkpoint, _ = write_checkpoint(tmp_path / "run", "tiny-vit", lambda1=0.125, lambda2=0.25)
    card = (export(checkpoint, tmp_path / "shared") / "README.md").read_text()
    assert card.startswith("---\ntags:\n- clip\n- rankclip\nlibrary_name: open_clip\n")
    for fact in ("**Architecture:** tiny-vit", "lambda1 0.125", "lambda2 0.25", "**Training data:** train.csv",
                 "**Epochs:** 2 of 4", "| eval ImageNet1K | zeroshot_top1 | 0.6250 |",
                 "| validation | contrastive_loss | 1.5000 |", "create_model_and_transforms('local-dir:shared')"):
        assert fact in card, fact
    assert "0.1250" not in card  # another epoch's result


@pytest.mark.parametrize("case, message", [
    ("foreign", "holds no model weights"),
    ("damaged", "damaged or not a torch file (PytorchStreamReader failed reading zip archive: "),
    ("code", "holds code (a pickled rankclip.config.Config) and is not loaded"),
    ("no model", "records no model and its weights are none of RN50, RN101, RN50x4, ViT-B/32: pass --model_name"),
    ("not empty", "exists and is not empty; choose a new folder, or pass --force"),
    ("other model", "--model_name tiny-rn is not the model of checkpoint"),
])
def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, case, message):
    good, bundle = write_checkpoint(tmp_path / "run", "tiny-vit")
    model = bundle.model
    path = tmp_path / "bad.pt"
    out = tmp_path / "out"
    extra = []
    if case == "foreign":
        torch.save({"epoch": 3, "notes": "no weights"}, path)
    elif case == "damaged":
        path.write_bytes(good.read_bytes()[:4096])
    elif case == "code":
        torch.save({"state_dict": model.state_dict(), "config": Config()}, path)
    elif case == "no model":
        torch.save({"state_dict": model.state_dict()}, path)
    elif case == "not empty":
        path = good
        out.mkdir()
        (out / "mine.txt").write_text("keep me")
    elif case == "other model":
        path, extra = good, ["--model_name", "tiny-rn"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export_main([str(path), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "not empty":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_force_replaces_an_earlier_export_only_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    checkpoint, _ = write_checkpoint(tmp_path / "run", "tiny-vit")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(checkpoint), str(out), "--force"]) == 2
    assert "is not an open_clip model folder (no open_clip_config.json): --force replaces an earlier export only" \
        in capsys.readouterr().err
    (out / "notes.txt").unlink()
    assert export_main([str(checkpoint), str(out)]) == 0  # an empty folder is filled
    (out / "README.md").write_text("old card")
    assert export_main([str(checkpoint), str(out), "--force"]) == 0
    assert "old card" not in (out / "README.md").read_text()

    def fail_half_way(model, tokenizer, model_config, save_directory, **kwargs):
        (Path(save_directory) / "open_clip_model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(exporting, "save_for_hf", fail_half_way)
    with pytest.raises(OSError):
        export(checkpoint, tmp_path / "new")
    with pytest.raises(OSError):
        export(checkpoint, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]
    assert (out / "open_clip_model.safetensors").stat().st_size > 1000  # the previous export stays whole


def test_a_checkpoint_without_a_model_exports_with_model_name(tmp_path):
    model = write_checkpoint(tmp_path / "run", "tiny-rn")[1].model
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    out = export(path, tmp_path / "out", model_name="tiny-rn")
    loaded = open_clip.create_model(f"local-dir:{out}")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
