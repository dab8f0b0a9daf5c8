"""The loss-curve PNG: drawn with matplotlib, skipped with a one-line note without it."""

from __future__ import annotations

import importlib.util

import pytest

from diffusion_core.training import plots


def _write_log(folder):
    rows = "\n".join(f"{s},{1.0 / s:.4f},0.001" for s in range(1, 80))
    (folder / "loss.csv").write_text("step,loss,lr\n" + rows + "\n")


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    _write_log(tmp_path)
    path = plots.write_loss_curve(tmp_path)
    assert path == tmp_path / plots.LOSS_CURVE and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_curve_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    _write_log(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert plots.write_loss_curve(tmp_path) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib" in out
    assert not (tmp_path / plots.LOSS_CURVE).exists()
