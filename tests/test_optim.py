"""Optimizer groups, and optimizer states of checkpoints written by the original RankCLIP / CyCLIP code."""

import copy
import re
from collections import OrderedDict

import open_clip
import pytest
import torch

import rankclip.models  # noqa: F401  (registers configs/ with open_clip)
from rankclip.main import main
from rankclip.config import OptimConfig
from rankclip.resume import restore_optimizer
from rankclip.optim import build_optimizer, grouped_names, state_by_name

# OpenAI's CLIP code, which CyCLIP and the original RankCLIP keep, registers a block's modules so.
ORIGINAL_BLOCK_ORDER = ("attn", "ln_1", "mlp", "ln_2")


def original_order(names: list[str]) -> list[str]:
    """open_clip's key order -> the original code's: within each residual block attn, ln_1, mlp, ln_2."""
    out, block, current = [], [], None
    for name in names + [""]:
        match = re.match(r".*resblocks\.\d+\.", name)
        prefix = match.group(0) if match else None
        if prefix != current and block:
            out.extend(sorted(block, key=lambda n: ORIGINAL_BLOCK_ORDER.index(n[len(current):].split(".")[0])))
            block = []
        current = prefix
        if prefix is not None:
            block.append(name)
        elif name:
            out.append(name)
    return out


def original_checkpoint(model: torch.nn.Module, batch: int = 4) -> tuple[dict, dict]:
    """What the original code writes after one real AdamW step of a DDP-wrapped model: `module.` keys
    in its registration order, and an optimizer built over model.named_parameters() in that order
    with its group rule (no decay for bn/ln/bias/logit_scale first). Also returns name -> exp_avg."""
    params = dict(model.named_parameters())
    order = original_order(list(model.state_dict()))
    exempt = [n for n in order if any(k in n for k in ("bn", "ln", "bias", "logit_scale"))]
    decay = [n for n in order if n not in exempt]
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in exempt], "weight_decay": 0},
                                   {"params": [params[n] for n in decay], "weight_decay": 0.1}], lr=1e-3)
    torch.manual_seed(0)
    image_features, text_features, scale = model(torch.randn(batch, 3, 32, 32), torch.randint(0, 400, (batch, 32)))
    logits = scale * image_features @ text_features.T
    torch.nn.functional.cross_entropy(logits, torch.arange(batch)).backward()
    optimizer.step()
    moments = {n: optimizer.state[params[n]]["exp_avg"].clone() for n in exempt + decay}
    state = model.state_dict()
    checkpoint = {"epoch": 1, "name": "original", "state_dict": OrderedDict(("module." + k, state[k]) for k in order),
                  "optimizer": optimizer.state_dict()}
    return checkpoint, moments


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("tiny-vit")


def test_original_optimizer_state_maps_by_name():
    model = tiny_vit()
    checkpoint, moments = original_checkpoint(model)
    saved_order = [k[len("module."):] for k in checkpoint["state_dict"]]
    assert saved_order != list(model.state_dict())  # the layouts really differ
    mapped, reason = state_by_name(checkpoint["optimizer"], saved_order, model)
    assert mapped is not None, reason
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    optimizer.load_state_dict(mapped)
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["exp_avg"], moments[name]), name
    decayed = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert decayed == {id(p) for n, p in model.named_parameters()
                       if not any(k in n for k in ("bn", "ln", "bias", "logit_scale"))}


def test_a_state_that_does_not_fit_is_refused_with_the_reason():
    model = tiny_vit()
    checkpoint, _ = original_checkpoint(model)
    saved_order = [k[len("module."):] for k in checkpoint["state_dict"]]
    state = checkpoint["optimizer"]
    first = state["param_groups"][0]["params"][0]
    state["state"][first]["exp_avg"] = torch.zeros(7)
    mapped, reason = state_by_name(state, saved_order, model)
    assert mapped is None and "exp_avg of" in reason and "(7,)" in reason
    mapped, reason = state_by_name(state, saved_order[:-3], model)  # a model with fewer parameters wrote it
    assert mapped is None and "groups hold" in reason


def test_training_continues_from_an_original_checkpoint(colour_data, tmp_path, capsys):
    model = tiny_vit()
    checkpoint, _ = original_checkpoint(model)
    torch.save(checkpoint, tmp_path / "original.pt")
    argv = ["--train_data", str(colour_data["train"]), "--checkpoint", str(tmp_path / "original.pt"),
            "--model_name", "tiny-vit", "--logs", str(tmp_path), "--name", "continued", "--num_workers", "0",
            "--batch_size", "64", "--epochs", "2", "--num_warmup_steps", "1", "--device", "cpu", "--loss", "clip"]
    assert main(argv) == 0
    assert (tmp_path / "continued" / "checkpoints" / "epoch_2.pt").is_file()
    output = capsys.readouterr().out
    assert "resumed from" in output and "optimizer state" not in output  # it mapped: no fresh-optimizer warning


def test_unmappable_state_starts_a_fresh_optimizer_with_one_warning(colour_data, tmp_path, capsys):
    model = tiny_vit()
    checkpoint, _ = original_checkpoint(model)
    first = checkpoint["optimizer"]["param_groups"][1]["params"][0]
    checkpoint["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "damaged.pt")
    argv = ["--train_data", str(colour_data["train"]), "--checkpoint", str(tmp_path / "damaged.pt"),
            "--model_name", "tiny-vit", "--logs", str(tmp_path), "--name", "fresh", "--num_workers", "0",
            "--batch_size", "64", "--epochs", "2", "--num_warmup_steps", "1", "--device", "cpu", "--loss", "clip"]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "optimizer state" in line]
    assert len(warnings) == 1 and "fresh" in warnings[0], warnings


def test_the_optimizer_is_fused_and_stays_fused_after_loading_an_unfused_state():
    """The fused AdamW kernel (5x the for-loop's speed on the CPU) is this trainer's choice; torch's
    load_state_dict would take `fused` from the saved groups, and the original code saved unfused ones."""
    model = tiny_vit()
    checkpoint, _ = original_checkpoint(model)
    reference = tiny_vit()
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
    restore_optimizer(checkpoint, model, optimizer)
    assert [group["fused"] for group in optimizer.param_groups] == [True, True]
    # The fused step equals torch's for-loop AdamW on the same state, to float rounding.
    named = dict(reference.named_parameters())
    plain = torch.optim.AdamW([{"params": [named[n] for n in names], "weight_decay": decay} for names, decay in
                               zip(grouped_names(list(named)), (0.0, 0.1))], lr=1e-3, foreach=False)
    saved = copy.deepcopy(optimizer.state_dict())  # its own moments, not the same tensors
    plain.load_state_dict(saved | {"param_groups": [dict(g, fused=None) for g in saved["param_groups"]]})
    for net in (model, reference):
        for param in net.parameters():
            param.grad = torch.full_like(param, 0.01)
    optimizer.step()
    plain.step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)


def test_resumed_optimizer_trains_with_this_runs_adamw_settings(capsys):
    """torch's load_state_dict takes weight decay, betas and eps from the saved groups; the run's flags
    (what params.txt shows) must win, and the difference is said."""
    from rankclip.logger import setup_console_logging

    setup_console_logging(0)
    model = tiny_vit()
    saved = build_optimizer(model, OptimConfig(weight_decay=0.1, beta1=0.9, beta2=0.999, eps=1e-8))
    checkpoint = {"state_dict": model.state_dict(), "optimizer": saved.state_dict()}
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.5, beta1=0.8, beta2=0.98, eps=1e-6))
    restore_optimizer(checkpoint, model, optimizer)
    assert [(g["weight_decay"], g["betas"], g["eps"], g["fused"]) for g in optimizer.param_groups] == [
        (0.0, (0.8, 0.98), 1e-6, True), (0.5, (0.8, 0.98), 1e-6, True)]
    lines = [line for line in capsys.readouterr().out.splitlines() if "AdamW" in line]
    assert len(lines) == 1 and "weight_decay 0.1 -> 0.5" in lines[0] and "eps 1e-08 -> 1e-06" in lines[0], lines


def test_a_resume_with_other_adamw_settings_is_refused_like_the_schedule(tmp_path):
    from rankclip.config import Config
    from rankclip.errors import CheckpointError
    from rankclip.resume import check_resumed_config

    saved = Config.from_dict({"name": "run", "train_data": "train.csv"}).to_dict()
    now = Config.from_dict({"name": "run", "train_data": "train.csv", "weight_decay": 0.5, "beta2": 0.98}).to_dict()
    with pytest.raises(CheckpointError, match=r"beta2 0.999 -> 0.98, weight_decay 0.1 -> 0.5.*--resume_allow_changes"):
        check_resumed_config({"config": saved, "epoch": 1}, tmp_path / "epoch_1.pt", now, world_size=1)
    check_resumed_config({"config": saved, "epoch": 1}, tmp_path / "epoch_1.pt", now | {"resume_allow_changes": True},
                         world_size=1)
