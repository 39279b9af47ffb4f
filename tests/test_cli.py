"""The command line prints what the README says it prints, and fails with a message, not a traceback."""

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from memit_lab.cli import main


def test_demo_on_a_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "tiny-gpt2", "-k", "3", "--no-tour", "The capital of France is"]) == 0
    out = capsys.readouterr().out
    assert "LoadedModel('tiny-gpt2'" in out and "'The capital of France is'" in out
    assert len([line for line in out.splitlines() if line.startswith("   ")]) == 3


def test_demo_tour_on_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "-k", "1", "--edits", "3", "--samples", "1", "--stats-tokens", "4096"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out and "' Tokyo'" in out
    assert "2. Where is the fact?" in out and "3. Which layers to edit?" in out and "memit: 3 facts edited" in out
    # The trace shown is the subject token where restoring MLPs helps, with the layer-0 confound measured.
    assert "at 'iffel' (strongest subject token):" in out and "at ' Tower' (last subject token):" in out
    single = out[out.index("One layer at a time") :].split("\n")[0]
    assert float(single.split("MLP 0 alone brings back ")[1].split(",")[0]) > 0.2, single
    # The before/after table (prompt, true, new, then P(true), P(new) before, P(true), P(new) after), then the scores.
    edited = out[out.index("memit: 3 facts edited") :].splitlines()
    table = [line.split() for line in edited[3:6]]
    assert all(float(row[-1]) > float(row[-3]) for row in table), edited[:6]  # P(new) rose for every fact
    memit_row = next(line.split() for line in edited if line.startswith("memit "))
    assert float(memit_row[2]) == 100.0  # ES after the edit


def test_demo_tour_traces_a_model_without_measured_defaults_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import memit_lab.layer_choice as layer_choice

    calls = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return recommend(*args, **kwargs)

    recommend = layer_choice.recommend_layers
    monkeypatch.setattr(layer_choice, "recommend_layers", counted)
    args = ["demo", "--model", "tiny-gpt2", "-k", "1", "--edits", "2", "--samples", "1", "--stats-tokens", "512"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1 and calls[0]["samples"] == 1, calls  # the tour's own trace, not for_model's as well
    assert "3. Which layers to edit?" in out and "memit: 2 facts edited" in out


def test_demo_tour_validates_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", "tiny-gpt2", "--edits", "0"]) == 2
    assert "--edits, --samples and --stats-tokens must be at least 1" in capsys.readouterr().err


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


def _write_requests(path: Path, requests: list[dict[str, str]]) -> str:
    import json

    path.write_text(json.dumps(requests))
    return str(path)


def test_edit_prints_probabilities_and_saves_a_model_load_model_reads(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import numpy as np
    import torch

    from memit_lab import load_model
    from memit_lab.evaluate import mean_nll

    edits = _write_requests(
        tmp_path / "edits.json",
        [{"prompt": "The {} is located in", "subject": "Eiffel Tower", "target_new": "Rome", "target_true": "Paris"}],
    )
    out = tmp_path / "edited"
    # "ft" is FT-L's old name, kept as an alias so old commands still run
    assert main(["edit", "--model", "tiny-gpt2", "--requests", edits, "--method", "ft", "--save-to", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ft: 1 edits" in printed and "The Eiffel Tower is located in" in printed and "P(new) after" in printed
    edited, fresh = load_model(str(out)), load_model("tiny-gpt2")
    # Only W_out of FT-L's layer differs from the unedited model; the tokenizer came along.
    layer = 1  # FtHyperParams.for_model: the middle of default_layers(3) = (0, 1)
    changed = {k for k, v in edited.model.state_dict().items() if not torch.equal(v, fresh.model.state_dict()[k])}
    assert changed == {fresh.adapter.w_out_module(layer) + ".weight"}
    assert edited.tokenizer("Eiffel Tower").input_ids == fresh.tokenizer("Eiffel Tower").input_ids
    p_after = float(np.exp(-mean_nll(edited, ["The Eiffel Tower is located in"], ["Rome"]))[0])
    row = next(line for line in printed.splitlines() if line.strip().startswith("The Eiffel Tower"))
    assert row.split()[7] == f"{p_after:.3f}"  # P(new) after, as the saved model computes it


def test_edit_refuses_conflicting_requests_and_writes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    edits = _write_requests(
        tmp_path / "edits.json",
        [
            {"prompt": "The {} is located in", "subject": "Eiffel Tower", "target_new": "Rome"},
            {"prompt": "The {} is located in", "subject": "Eiffel Tower", "target_new": "Berlin"},
        ],
    )
    out = tmp_path / "edited"
    assert main(["edit", "--model", "tiny-gpt2", "--requests", edits, "--save-to", str(out)]) == 2
    assert "conflicting requests" in capsys.readouterr().err
    assert not out.exists()


def test_eval_edits_together_with_any_registered_name_and_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "table.csv"
    assert main(["eval", "--model", "tiny-gpt2", "--n", "2", "--method", "rome", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "editing them with rome-seq together" in printed and "edit wall time" in printed
    table = pd.read_csv(out, index_col=0)
    assert list(table.index) == ["unedited", "rome-seq"] and {"S", "ES", "PS", "NS"} <= set(table.columns)
    with pytest.raises(SystemExit):  # not a registered method: argparse lists the registry's choices
        main(["eval", "--model", "tiny-gpt2", "--method", "mend"])
    assert "choose from 'memit', 'rome-seq', 'ft-l', 'ft-w', 'alphaedit', 'rome', 'ft'" in capsys.readouterr().err


def test_eval_with_batch_size_edits_batch_after_batch_and_prints_the_diagnostics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sequential.csv"
    args = ["eval", "--model", "tiny-gpt2", "--n", "3", "--batch-size", "2", "--method", "alphaedit"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "in batches of 2, one after another" in printed and "Collapse diagnostics" in printed
    table = pd.read_csv(out)
    assert table.method.tolist() == ["unedited", "alphaedit", "alphaedit"]
    assert table.edits.tolist() == [0, 2, 3] and table.perplexity.notna().all()
    assert main([*args[:-2], "--batch-size", "0"]) == 2
    assert "--n and --batch-size must be at least 1" in capsys.readouterr().err


def test_eval_data_skips_malformed_records_and_names_them_unless_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real zsRE file with one empty answer is edited without it (reported by index); --strict refuses it."""
    data = json.loads((Path(__file__).parent / "fixtures" / "zsre_small.json").read_text())
    data.insert(1, {**data[0], "answers": [""]})
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps(data))
    edited: list[Any] = []

    def scored(lm: Any, records: Any, method: str, args: Any) -> pd.DataFrame:  # the edit itself is tested above
        edited.extend(records)
        return pd.DataFrame({"efficacy": [0.0]})

    monkeypatch.setattr("memit_lab.cli._eval_together", scored)
    assert main(["eval", "--model", "tiny-gpt2", "--data", str(path), "--n", "5"]) == 0
    printed = capsys.readouterr().out
    assert "zsre.json: skipped 1 of 3 records (indices 1): record 1: answers[0] must be a non-empty string" in printed
    assert "Pass --strict" in printed and "2 records from" in printed
    assert [r.subject for r in edited] == ["Lyon", "Ludwig van Beethoven"]
    edited.clear()
    assert main(["eval", "--model", "tiny-gpt2", "--data", str(path), "--strict"]) == 2
    assert "record 1: answers[0] must be a non-empty string" in capsys.readouterr().err
    assert edited == []  # refused before any model was loaded or edited
