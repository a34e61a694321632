"""rankclip.compare: grid expansion and checks, cell states, and a tiny study through the CLI."""

import json
import os
import shutil
import signal
import sys

import pytest
import torch

from rankclip.errors import ConfigError
from rankclip import compare
from rankclip.compare import FINISHED, FRESH, INTERRUPTED, cell_name, cell_state, parse_study

EPOCHS = 2


def base_flags(data):
    return ["--train_data", str(data["train"]), "--validation_data", str(data["validation"]),
            "--eval_data_type", "ImageNet1K", "--eval_test_data_dir", str(data["zeroshot"]),
            "--model_name", "tiny-vit", "--num_workers", "0", "--batch_size", "128", "--lr", "2e-3",
            "--num_warmup_steps", "1", "--epochs", str(EPOCHS), "--device", "cpu"]


def study_flags(data, logs, *grid, name="tiny"):
    return ["--name", name, "--logs", str(logs), "--grid", *grid, *base_flags(data)]


def test_grid_expands_to_every_combination_in_order(colour_data, tmp_path):
    study = parse_study(study_flags(colour_data, tmp_path, "loss=clip,rankclip", "seed=0,1", "inmodal=false,true"))
    names = [cell.name for cell in study.cells]
    assert names[:3] == ["loss=clip_seed=0_inmodal=false", "loss=clip_seed=0_inmodal=true",
                         "loss=clip_seed=1_inmodal=false"]
    assert len(names) == len(set(names)) == 8
    settings = {(c.config.objective.loss, c.config.run.seed, c.config.data.inmodal) for c in study.cells}
    assert settings == {(loss, seed, inmodal) for loss in ("clip", "rankclip") for seed in (0, 1)
                        for inmodal in (False, True)}
    cell = study.cells[1]
    assert cell.run_dir == tmp_path / "tiny" / "loss=clip_seed=0_inmodal=true"
    assert cell.config.training.epochs == EPOCHS and cell.config.model.model_name == "tiny-vit"
    command = compare.cell_command(cell, nproc_per_node=1)
    assert command[:3] == [sys.executable, "-m", "rankclip.main"]
    assert command[-11:] == ["--loss", "clip", "--seed", "0", "--inmodal", "--logs_dir", str(tmp_path / "tiny"),
                             "--name", cell.name, "--resume", "auto"]
    torchrun = compare.cell_command(cell, nproc_per_node=2)
    assert torchrun[1:9] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "--signals_to_handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "-m"]
    assert torchrun[-2:] == ["--resume", "auto"]


def test_schedule_clipping_and_frequency_flags_are_grid_axes(colour_data, tmp_path):
    axes = {"lr_scheduler=cosine,const,const-cooldown": ("cosine", "const", "const-cooldown"),
            "epochs_cooldown=1,2": (1, 2), "lr_cooldown_end=0,1e-6": (0.0, 1e-6), "lr_cooldown_power=1,2": (1.0, 2.0),
            "grad_clip_norm=1,5": (1.0, 5.0), "zeroshot_frequency=0,2": (0, 2), "val_frequency=1,3": (1, 3)}
    for spec, parsed in axes.items():
        assert compare.parse_axis(spec).parsed == parsed, spec
    study = parse_study([*study_flags(colour_data, tmp_path, "lr_scheduler=cosine,const-cooldown", "grad_clip_norm=1,5"),
                         "--epochs_cooldown", "1", "--val_frequency", "2"])
    assert [(c.config.optim.lr_scheduler, c.config.training.grad_clip_norm) for c in study.cells] == [
        ("cosine", 1.0), ("cosine", 5.0), ("const-cooldown", 1.0), ("const-cooldown", 5.0)]
    assert {(c.config.optim.epochs_cooldown, c.config.evaluation.val_frequency) for c in study.cells} == {(1, 2)}


def test_cell_names_are_plain_folder_names():
    assert cell_name([("model_name", "ViT-B/32"), ("lambda1", "0.0625")]) == "model_name=ViT-B-32_lambda1=0.0625"


def test_no_flags_is_the_demo_study():
    study = parse_study([])
    assert study.study_dir.name == "demo_study"
    assert [(c.config.objective.loss, c.config.run.seed) for c in study.cells] == [
        (loss, seed) for loss in ("clip", "cyclip", "rankclip") for seed in (0, 1)]
    assert all(c.config.model.model_name == "tiny-vit" and c.config.training.epochs == 2
               and c.config.objective.cylambda1 == 0.25 and os.path.isabs(c.config.data.train_data) for c in study.cells)


@pytest.mark.parametrize("grid, message", [
    (["seed=a"], "--grid seed=a: argument --seed: invalid int value: 'a'"),
    (["loss=clip,hinge"], "--grid loss=hinge: argument --loss: invalid choice: 'hinge'"),
    (["lr=fast"], "--grid lr=fast: argument --lr: invalid float value"),
    (["inmodal=yes"], "--grid inmodal=yes: --inmodal is on or off"),
    (["colour=red"], "--grid colour: not a setting of a run"),
    (["name=a,b"], "--grid name: compare sets --name"),
    (["eval_data_type=CIFAR10"], "--grid eval_data_type: --eval_data_type takes several values"),
    (["model_name=tiny-vit,tiny-rn"], "--grid model_name: the cells would differ in data, model"),
    (["seed=0,0"], "--grid seed=0,0: give each value once"),
    (["seed"], "--grid 'seed': write KEY=VALUE1,VALUE2"),
    (["seed=0", "seed=1"], "--grid names seed more than once"),
    (["lr=0.1,1e-1"], None),  # two spellings of one value are two folders: allowed
    (["epochs=0"], "cell epochs=0: --epochs must be positive"),
    (["seed=0", "--colour", "red"], "--colour: not a flag of rankclip.compare or rankclip.main"),
    (["seed=0", "--batch_size", "big"], "argument --batch_size: invalid int value: 'big'"),
])
def test_bad_grid_is_one_line_naming_the_flag(colour_data, tmp_path, capsys, grid, message):
    argv = study_flags(colour_data, tmp_path, *grid)
    if message is None:
        assert len(parse_study(argv).cells) == 2
        return
    assert compare.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rankclip.compare: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "tiny").exists()


def test_base_flags_may_not_override_an_axis_or_set_what_compare_sets(colour_data, tmp_path):
    with pytest.raises(ConfigError, match="--grid inmodal=false: the base configuration overrides it"):
        parse_study([*study_flags(colour_data, tmp_path, "inmodal=false,true"), "--inmodal"])
    with pytest.raises(ConfigError, match="--resume: compare sets it for each cell"):
        parse_study([*study_flags(colour_data, tmp_path, "seed=0"), "--resume", "latest"])
    with pytest.raises(ConfigError, match="--name is missing"):
        parse_study(["--grid", "seed=0", *base_flags(colour_data)])


def fake_run(run_dir, last_epoch, checkpoints=()):
    """A run folder stopped after `last_epoch`, holding the named checkpoint files."""
    (run_dir / "checkpoints").mkdir(parents=True)
    rows = [{"epoch": 0, "split": "eval", "zeroshot_top1": 0.1}]
    rows += [{"epoch": e, "split": split} for e in range(1, last_epoch + 1) for split in ("train", "eval")]
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in checkpoints:
        torch.save({"epoch": 1}, run_dir / "checkpoints" / name)


def test_cell_state_finished_interrupted_fresh(colour_data, tmp_path, capsys):
    study = parse_study(study_flags(colour_data, tmp_path, "seed=0,1,2,3,4"))
    done, killed_in_epoch_2, killed_saving, killed_in_epoch_1, never = study.cells
    fake_run(done.run_dir, EPOCHS, ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"])
    fake_run(killed_in_epoch_2.run_dir, 1, ["epoch_1.pt", "epoch_latest.pt"])
    fake_run(killed_saving.run_dir, EPOCHS, ["epoch_1.pt", "epoch_latest.pt"])  # results of 2, checkpoint of 1
    fake_run(killed_in_epoch_1.run_dir, 0)
    assert [cell_state(c) for c in study.cells] == [FINISHED, INTERRUPTED, INTERRUPTED, FRESH, FRESH]
    assert compare.main(["--print_commands", *study_flags(colour_data, tmp_path, "seed=0,1,2,3,4")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all(" -m rankclip.main " in line for line in lines)
    assert all(line.endswith("--resume auto") for line in lines)  # one command per cell, whatever its state


def test_rerun_skips_finished_cells_and_resumes_interrupted_ones(colour_data, tmp_path, monkeypatch, capsys):
    argv = study_flags(colour_data, tmp_path, "seed=0,1,2")
    done, killed, never = parse_study(argv).cells
    fake_run(done.run_dir, EPOCHS, ["epoch_2.pt", "epoch_latest.pt"])
    fake_run(killed.run_dir, 1, ["epoch_1.pt", "epoch_latest.pt"])
    launched = []

    class FakeProcess:  # records the command; the real launch is covered by the study test below
        def __init__(self, command, env):
            launched.append(command)
            assert env["PYTHONPATH"].split(os.pathsep)[0] == str(compare.Path(compare.__file__).parent.parent)

        def wait(self):
            return 1

    monkeypatch.setattr(compare.subprocess, "Popen", FakeProcess)
    assert compare.main(argv) == 1  # the fake cells do not finish
    assert [command[command.index("--name") + 1] for command in launched] == [killed.name, never.name]
    assert all(command[-2:] == ["--resume", "auto"] for command in launched)
    out, err = capsys.readouterr()
    assert f"{done.name}: finished, skipped" in out
    assert "2 cells did not finish" in err


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_is_passed_to_the_cell_and_stops_the_study_with_75(colour_data, tmp_path, monkeypatch, capsys,
                                                                          stop):
    signals, launched = [], []

    class FakeProcess:  # the scheduler's signal arrives while the first cell runs; the cell saves, exits 75
        def __init__(self, command, env):
            launched.append(command)

        def wait(self):
            os.kill(os.getpid(), stop)
            return 75

        def send_signal(self, signum):
            signals.append(signum)

    def outside(signum, frame):  # what would see the signal were it not passed on (instead of ending pytest)
        signals.append("outside")

    monkeypatch.setattr(compare.subprocess, "Popen", FakeProcess)
    previous = signal.signal(stop, outside)
    try:
        assert compare.main(study_flags(colour_data, tmp_path, "seed=0,1")) == 75
        assert signal.getsignal(stop) is outside  # restored after the cell
    finally:
        signal.signal(stop, previous)
    assert signals == [stop] and len(launched) == 1
    assert "stopped in cell seed=0; run the same command again" in capsys.readouterr().err


def test_a_cell_that_stops_by_itself_stops_the_study_with_75(colour_data, tmp_path, monkeypatch, capsys):
    """The signal reached the trainer only (e.g. its own PID): it saved and exited 75. The study must not
    record it as failed and go on to the next cell on a machine that is being taken away."""
    launched = []

    class FakeProcess:
        def __init__(self, command, env):
            launched.append(command)

        def wait(self):
            return 75

    monkeypatch.setattr(compare.subprocess, "Popen", FakeProcess)
    assert compare.main(study_flags(colour_data, tmp_path, "seed=0,1")) == 75
    assert len(launched) == 1
    err = capsys.readouterr().err
    assert "stopped in cell seed=0; run the same command again" in err and "failed" not in err


@pytest.mark.parametrize("returncode, stopped_by, torchrun, status", [
    (75, None, False, 75),  # the cell alone got the signal
    (75, signal.SIGUSR1, False, 75),
    (0, signal.SIGTERM, False, 75),  # it had just finished
    (1, signal.SIGTERM, True, 75),  # torchrun's exit after passing the signal on
    (1, signal.SIGTERM, False, 128 + signal.SIGTERM),  # a failure
    (130, signal.SIGINT, False, 130),
])
def test_the_study_exit_status_after_a_stopped_cell(returncode, stopped_by, torchrun, status):
    assert compare.study_stop_status(returncode, stopped_by, torchrun) == status


def test_a_started_cell_with_other_settings_is_refused(colour_data, tmp_path):
    study = parse_study(study_flags(colour_data, tmp_path, "seed=0"))
    study.cells[0].run_dir.mkdir(parents=True)
    (study.cells[0].run_dir / "params.txt").write_text("epochs: 5\nnum_workers: 3\nseed: 0\n")
    with pytest.raises(ConfigError, match=r"was started with other settings \(epochs: 5 -> 2\)"):
        parse_study(study_flags(colour_data, tmp_path, "seed=0"))


@pytest.mark.e2e
def test_tiny_study_end_to_end(colour_data, tmp_path, capsys):
    """2 objectives x 2 seeds through the CLI, the report, then a re-run after a real interruption."""
    argv = study_flags(colour_data, tmp_path, "loss=clip,rankclip", "seed=0,1")
    assert compare.main(argv) == 0
    study = tmp_path / "tiny"
    cells = ["loss=clip_seed=0", "loss=clip_seed=1", "loss=rankclip_seed=0", "loss=rankclip_seed=1"]
    assert sorted(p.name for p in study.iterdir() if p.is_dir()) == cells
    report = json.loads((study / "report.json").read_text())
    assert [c["label"] for c in report["configurations"]] == ["loss=clip", "loss=rankclip"]
    assert report["differing_settings"] == ["loss"]

    def final(cell, split):
        rows = [json.loads(line) for line in (study / cell / "results.jsonl").read_text().splitlines()]
        return [r for r in rows if r["epoch"] == EPOCHS and r["split"] == split][-1]

    top1 = report["tables"]["Zero-shot accuracy"]["rows"]["loss=rankclip"]["ImageNet1K top-1"]
    assert top1["values"] == [final(c, "eval")["zeroshot_top1"] for c in cells[2:]]
    assert "| loss=clip | 2 | 2 |" in (study / "report.md").read_text()
    assert (study / "report.png").is_file()

    # Make loss=rankclip_seed=1 look stopped during its last epoch, as a kill would leave it.
    killed = study / cells[3]
    before = {split: final(cells[3], split) for split in ("validation", "eval")}
    checkpoints = killed / "checkpoints"
    (checkpoints / f"epoch_{EPOCHS}.pt").unlink()
    for alias in ("epoch_latest.pt", "epoch.best.pt"):  # hard links of epoch_<N>.pt: replace, never write through
        (checkpoints / alias).unlink()
        shutil.copy(checkpoints / f"epoch_{EPOCHS - 1}.pt", checkpoints / alias)
    for log in ("results.jsonl", "steps.jsonl"):
        kept = [line for line in (killed / log).read_text().splitlines() if json.loads(line)["epoch"] < EPOCHS]
        (killed / log).write_text("\n".join(kept) + "\n")
    untouched = {c: (study / c / "results.jsonl").stat().st_mtime_ns for c in cells[:3]}
    capsys.readouterr()
    assert compare.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 3 and f"{cells[3]}: resuming" in out
    assert {c: (study / c / "results.jsonl").stat().st_mtime_ns for c in cells[:3]} == untouched
    assert {split: final(cells[3], split) for split in before} == before  # the resumed run is the same run
    assert "resumed from" in (killed / "output.log").read_text()


def test_a_started_cell_may_have_saved_and_logged_otherwise(colour_data, tmp_path):
    """Requeuing a study with another save interval, retention or log interval continues its cells."""
    study = parse_study(study_flags(colour_data, tmp_path, "seed=0"))
    study.cells[0].run_dir.mkdir(parents=True)
    stored = {k: str(v) for k, v in study.cells[0].config.to_dict().items()} | {
        "save_every_minutes": "10.0", "save_every_steps": "50", "keep_checkpoints": "1", "log_every_n_steps": "3",
        "best_metric": "eval/ImageNet1K/zeroshot_top1", "resume_allow_changes": "True"}
    (study.cells[0].run_dir / "params.txt").write_text("".join(f"{k}: {v}\n" for k, v in stored.items()))
    parse_study(study_flags(colour_data, tmp_path, "seed=0"))
