"""stages.store's atomic writes: an output is replaced whole or left as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import store


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out" / "model.pt"
    with store.atomic_file(target) as tmp:
        torch.save({"w": torch.ones(2)}, tmp)
    direct = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, direct)
    assert target.read_bytes() == direct.read_bytes()  # torch.save names its archive after the file
    with pytest.raises(KeyboardInterrupt), store.atomic_file(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise KeyboardInterrupt
    assert target.read_bytes() == direct.read_bytes()
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]  # no temporary left behind


def test_metrics_files_are_written_atomically(tmp_path, monkeypatch):
    """write_metrics wrote the DVC metrics file in place: a stage killed while writing it left half a
    JSON document that DVC then failed to read."""
    path = tmp_path / "metrics.json"
    store.write_metrics(path, {"top1": 0.5, "seconds": 3.0})  # volatile keys stay out
    assert path.read_text() == '{\n  "top1": 0.5\n}\n'
    write_text = Path.write_text

    def killed_half_way(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        store.write_metrics(path, {"top1": 0.75})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "top1": 0.5\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
