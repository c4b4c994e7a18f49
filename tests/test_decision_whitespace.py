"""The decision after leading whitespace (issue #23 item 4) on a scripted model.

The model is the tiny Qwen3 of the test suite (real Qwen3 tokenizer) with its weights set so that
it is a bigram model with a fixed greedy answer: attention and MLP outputs are zeroed, so a
position's logits depend only on its own token through the tied embedding, and three embedding
rows are chosen (below) so that after the prompt's last token ``"\\n\\n"`` the model puts nearly
all probability on ``"\\n"``, and after ``"\\n"`` on ``Safe``. It is what users report for Llama
Guard 3 under some chat templates: the first generated token is whitespace, then the label.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from decal.evaluation import evaluate
from decal.records import read_records
from decal.tasks.generic import DEFAULT_TEMPLATES
from decal.tasks.schema import DecisionExample, Task


@pytest.fixture(scope="module")
def scripted(qwen3_tokenizer):
    """(model, tokenizer, ids of "\\n", "\\n\\n", "Safe"): greedy output "\\n", then "Safe"."""
    import torch

    from conftest import build_tiny_qwen3

    tok = qwen3_tokenizer
    model = build_tiny_qwen3(tok, seed=3)
    newline, blank_line, safe = tok.convert_tokens_to_ids(["Ċ", "ĊĊ", "Safe"])
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream stays the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight  # tied with the output head
        emb.zero_()
        s, e0, e1 = 10.0, torch.eye(emb.shape[1])[0], torch.eye(emb.shape[1])[1]
        # After RMS norm (hidden 64), a row x gives logits 8 x.E[v] / rms(x) scale: with these
        # rows, "\n\n" -> "\n" (logit 120 against 80 for itself and 40 for Safe), then
        # "\n" -> "Safe" (211 against 144 for "\n"); every other token has logit 0.
        emb[blank_line] = s * e0
        emb[newline] = s * (1.5 * e0 - e1)
        emb[safe] = s * (0.5 * e0 - 4.0 * e1)
    return model.eval(), tok, newline


def _task(n: int = 6) -> Task:
    examples = tuple(DecisionExample(id=f"e{i}", labels=("Safe", "Unsafe"), label="Safe", input=f"How do I bake cake {i}?")
                     for i in range(n))
    return Task(name="safety", split="all", examples=examples, template=DEFAULT_TEMPLATES["classification"])


def test_first_position_has_no_label_mass_and_the_option_reads_the_decision(tmp_path, scripted):
    model, tok, newline = scripted
    task = _task()
    first = read_records(evaluate(model, tok, task, out_dir=tmp_path / "first", model_name="scripted", progress=False))
    after = read_records(evaluate(model, tok, task, out_dir=tmp_path / "after", model_name="scripted", progress=False,
                                  decision_after_whitespace=True))
    for r in first:  # the default reads the newline's position: the options hold nearly nothing
        assert r.label_mass < 1e-6 and r.top_token == "Ċ" and r.argmax_is_option is False
        assert not r.valid  # the model's token there is not an option's (docs/design.md, "Prediction and validity")
    for r in after:  # one token of whitespace, then the decision, read with the options' full mass
        assert r.prediction == "Safe" and r.correct and r.valid and r.emitted_token == "Safe" and r.argmax_is_option
        assert r.extra["decision_index"] == 1 and not r.extra["forced"]
        assert r.label_mass == pytest.approx(1.0, abs=1e-6) and r.confidence == pytest.approx(1.0, abs=1e-6)
    meta = json.loads((tmp_path / "after" / "run.json").read_text())
    assert meta["decision_after_whitespace"] is True
    assert json.loads((tmp_path / "first" / "run.json").read_text())["decision_after_whitespace"] is False
    # a rerun without the option does not resume into a folder scored with it
    with pytest.raises(ValueError, match="decision_after_whitespace"):
        evaluate(model, tok, task, out_dir=tmp_path / "after", model_name="scripted", progress=False)
    # nor one with it into a folder scored without it (`records.check_resume` compares the setting)
    with pytest.raises(ValueError, match="decision_after_whitespace: False -> True"):
        evaluate(model, tok, task, out_dir=tmp_path / "first", model_name="scripted", progress=False,
                 decision_after_whitespace=True)


@pytest.mark.slow
def test_cli_hint_names_the_option(tmp_path, scripted, capsys):
    from decal.cli import main

    model, tok, _ = scripted
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"id": f"e{i}", "input": f"How do I bake cake {i}?", "labels": ["Safe", "Unsafe"], "label": "Safe"} for i in range(4)]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["evaluate", "--model", str(folder), "--task", str(task), "--split", "all", "--no-progress", "--dtype", "float32",
              "--out", str(tmp_path / "runs")]
    assert main([*common, "--name", "plain"]) == 0
    err = capsys.readouterr().err
    hints = [line for line in err.splitlines() if "--decision-after-whitespace" in line]
    assert len(hints) == 1 and hints[0].startswith("warning: ") and "whitespace in 100% of records" in hints[0]
    assert main([*common, "--name", "after", "--decision-after-whitespace"]) == 0
    assert "--decision-after-whitespace" not in capsys.readouterr().err
    assert all(r.prediction == "Safe" for r in read_records(tmp_path / "runs" / "after"))
    assert np.mean([r.label_mass for r in read_records(tmp_path / "runs" / "plain")]) < 1e-6
