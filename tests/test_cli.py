"""The `vitkern` CLI: `info` reports backends and reasons; `check` prints a parity table and fails on a mismatch."""

import pytest
import torch

from vitkern import cli, dispatch, parity


def test_info_reports_versions_and_backend_choice(monkeypatch, capsys):
    monkeypatch.delenv("VITKERN_AUTOTUNE", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch 2." in out and "vitkern.layer_norm forward" in out
    for op in dispatch.ops():  # every registered op family has a probe
        assert f"vitkern.{op} forward" in out and f"vitkern.{op} backward" in out, op
    assert "probe failed" not in out
    assert "CUDA C++ extension:" in out
    assert "Triton launch configs: autotuned per launch key" in out
    if not torch.cuda.is_available():
        assert "interpreter" in out


def test_info_reports_the_autotune_switch(monkeypatch, capsys):
    monkeypatch.setenv("VITKERN_AUTOTUNE", "0")
    assert cli.main(["info"]) == 0
    assert "Triton launch configs: first config of each launcher, not tuned (VITKERN_AUTOTUNE=0)" in capsys.readouterr().out
    monkeypatch.setenv("VITKERN_AUTOTUNE", "yes please")
    assert cli.main(["info"]) == 0
    assert "VITKERN_AUTOTUNE must be 1" in capsys.readouterr().out


@pytest.mark.interpreter
def test_check_runs_a_small_model_through_the_kernels(capsys):
    assert cli.main(["check", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    for op in ("patch_embed", "layer_norm", "attention", "model"):
        assert any(line.startswith(op) and " ok" in line for line in out.splitlines()), op
    assert "triton" in out and "0 failed" in out


@pytest.mark.interpreter
def test_check_flags_a_wrong_kernel(monkeypatch, capsys):
    """A parity table that cannot fail is worthless: corrupt the Triton output and expect FAIL rows."""
    from vitkern.ops import layer_norm as ln

    original = ln.LayerNormTriton.forward

    def corrupted(self, *args):
        y, s, mean, rstd = original(self, *args)
        return y * 1.01, s, mean, rstd

    monkeypatch.setattr(ln.LayerNormTriton, "forward", corrupted)
    assert cli.main(["check", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_format_rows_aligns_columns():
    rows = [parity.ParityRow("layer_norm", "a", "2x3", "float32", "triton", 1e-7, 1e-7, 1e-6, "ok")]
    text = parity.format_rows(rows)
    assert text.splitlines()[0].startswith("op") and "1.00e-07" in text
