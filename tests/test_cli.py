"""The command line prints what the README says it prints, and fails with a message, not a traceback."""

import pytest

from memit_lab.cli import main


def test_demo_on_a_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "tiny-gpt2", "-k", "3", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "LoadedModel('tiny-gpt2'" in out and "'The capital of France is'" in out
    assert len([line for line in out.splitlines() if line.startswith("   ")]) == 3


def test_demo_on_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out and "' Tokyo'" in out


def test_unknown_model_is_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "nobody/nothing"]) == 2
    assert "memit-lab: error: model 'nobody/nothing'" in capsys.readouterr().err


def test_trace_prints_the_peak_cells(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["trace", "--model", "tiny-llama", "--prompt", "The capital of France is", "--subject", "France"]
    assert main([*args, "--target", "Paris", "--severed", "mlp", "--samples", "2", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "corrupted" in out and "restoring hidden" in out
    assert len([line for line in out.splitlines() if " True " in line or " False " in line]) == 2
    assert main([*args, "--kind", "attn"]) == 2  # window 10 on a 3-layer model
    assert "window=10 does not fit a model of 3 layers" in capsys.readouterr().err
