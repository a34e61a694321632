import errno
import os
from pathlib import Path

import pytest
import torch

from rankclip.weights import read_checkpoint
from rankclip.files import atomic_alias, atomic_file, atomic_save, atomic_write_text


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


def record_fsyncs(monkeypatch) -> list[str]:
    """The paths that os.fsync is called on from now on."""
    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_a_copied_alias_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    source = tmp_path / "epoch_1.pt"
    atomic_save({"value": torch.tensor(1)}, source)
    synced = record_fsyncs(monkeypatch)

    def no_hard_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_hard_links)
    atomic_alias(source, tmp_path / "epoch_latest.pt")
    assert read_checkpoint(tmp_path / "epoch_latest.pt")["value"].item() == 1
    assert any(Path(p).name.startswith(".epoch_latest.pt.tmp") for p in synced), synced  # the copy, before rename
    assert synced[-1] == str(tmp_path)  # the folder, after the rename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_1.pt", "epoch_latest.pt"]


def test_a_saved_file_is_renamed_durably(tmp_path, monkeypatch):
    synced = record_fsyncs(monkeypatch)
    atomic_save({"value": torch.tensor(1)}, tmp_path / "ckpt.pt")
    assert synced[-1] == str(tmp_path)


def test_written_text_is_fsynced_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    synced = record_fsyncs(monkeypatch)
    atomic_write_text(tmp_path / "report.md", "é\n")
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "é\n"
    assert Path(synced[0]).name.startswith(".report.md.tmp") and synced[-1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_a_failed_write_keeps_the_previous_text(tmp_path):
    path = tmp_path / "train.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(path, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["train.csv"]
