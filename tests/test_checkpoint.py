import pytest
import torch

from rankclip.checkpoint import Checkpointer, atomic_save, extract_state_dict, load_model_weights, read_checkpoint
from rankclip.config import Config, ConfigError


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"value": torch.tensor(1)}, path)

    def explode(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"value": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["value"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_module_prefixes_are_removed():
    state = extract_state_dict({"epoch": 3, "state_dict": {"module.visual.w": 1, "logit_scale": 2}})
    assert state == {"visual.w": 1, "logit_scale": 2}


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"module.weight": torch.zeros(2, 2), "extra": torch.zeros(1)}}, path)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"missing \['bias'\], unexpected \['extra'\]"):
        load_model_weights(model, path)


def test_pickled_code_is_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": Config()}, path)  # an arbitrary class needs full unpickling
    with pytest.raises(ConfigError, match="weights-only"):
        read_checkpoint(path)


def test_checkpointer_keeps_latest_and_best(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpointer = Checkpointer(tmp_path)
    cfg = Config(name="run", model_name="tiny-vit")
    for epoch, loss in [(1, 2.0), (2, 1.0), (3, 1.5)]:
        with torch.no_grad():
            model.bias.fill_(epoch)
        checkpointer.save(epoch=epoch, step=10 * epoch, cfg=cfg, model=model, optimizer=optimizer, scaler=None,
                          validation_loss=loss)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch.best.pt", "epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_latest.pt"]
    latest, best = read_checkpoint(folder / "epoch_latest.pt"), read_checkpoint(folder / "epoch.best.pt")
    assert (latest["epoch"], latest["step"], latest["state_dict"]["bias"][0].item()) == (3, 30, 3.0)
    assert (best["epoch"], best["best_validation_loss"]) == (2, 1.0)
    assert latest["config"]["model_name"] == "tiny-vit" and latest["model_name"] == "tiny-vit"
    assert set(latest["rng"]) >= {"torch", "python"}
