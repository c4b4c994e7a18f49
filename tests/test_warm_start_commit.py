"""The committed warm start (`--warm-start-labels commit`, issue #22 item 1): one label per rationale, the
sample rule unchanged, a refused conflict, and a run end to end on the tiny Qwen3."""

from __future__ import annotations

import collections
import hashlib
import json
import re

import pytest
import yaml

from decal.cli import main
from decal.errors import ConfigError
from decal.tasks import load_task
from decal.training.config import TrainConfig
from decal.training.warm_start import (
    commit_warm_start_labels,
    draw_warm_start_labels,
    warm_start_labels,
    warm_start_rows,
)

FLAGS = ["--method", "sft", "--reasoning", "--task", "verdicts", "--split", "train", "--limit", "8", "--batch-size",
         "4", "--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8", "--learning-rate", "0.01"]
_COUNTS = re.compile(r": (\d+) positive, (\d+) negative\.$")


@pytest.mark.parametrize("variant, split", [("in", "train"), ("ood", "test")])
def test_commit_gives_one_label_per_rationale_over_a_whole_split(variant, split):
    task = load_task(f"verdicts:variant={variant}", split)
    labels = commit_warm_start_labels(task)
    by_text, by_counts = collections.defaultdict(set), collections.defaultdict(set)
    for example, label in zip(task.examples, labels):
        by_text[example.reasoning].add(label)
        n_pos, n_neg = map(int, _COUNTS.search(example.reasoning).groups())
        by_counts[n_pos, n_neg].add(label)
    assert all(len(s) == 1 for s in by_text.values())
    # stronger: the label follows from the counts the rationale states (more positive -> Positive,
    # more negative -> Negative, a tie -> Positive, the first option), whatever the words
    assert all(len(s) == 1 for s in by_counts.values())
    for (n_pos, n_neg), (label,) in by_counts.items():
        assert label == ("Positive" if n_pos >= n_neg else "Negative"), (n_pos, n_neg)
    assert any(n_pos == n_neg for n_pos, n_neg in by_counts)  # ties occur (18 % of in-domain examples)
    # the committed label is the Bayes label, so it differs from the drawn gold label on ~22 % of the split
    differ = sum(label != ex.label for label, ex in zip(labels, task.examples)) / len(task)
    assert 0.12 < differ < 0.32, differ


def test_sample_keeps_todays_draws(qwen3_tokenizer):
    task = load_task("verdicts", "train")
    drawn = draw_warm_start_labels(task, seed=0)
    assert warm_start_labels(task, rule="sample", seed=0) == drawn
    # The draws of the landed warm start (seed 0, the whole train split), pinned: the function that made
    # the hedging condition's numbers must keep drawing exactly these labels.
    digest = hashlib.sha256(",".join(drawn).encode()).hexdigest()[:16]
    assert digest == "59839674abe9c4a8", digest  # computed with the code before issue #22
    assert [r["drawn_label"] for r in warm_start_rows(load_task("verdicts", "train", n=30, reasoning=True),
                                                      qwen3_tokenizer, seed=0)] == drawn[:30]
    with pytest.raises(ValueError, match="`rule` must be one of sample, commit"):
        warm_start_labels(task, rule="argmax")


def test_commit_refuses_one_rationale_with_two_conclusions_before_any_model_loads(tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    rows = [{"id": "a", "input": "x", "labels": ["Yes", "No"], "label": "Yes", "reasoning": "x means yes."},
            {"id": "b", "input": "y", "labels": ["Yes", "No"], "label": "No", "reasoning": "x means yes."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["train", "--model", str(tmp_path / "no-model"), "--method", "sft", "--reasoning", "--task", str(path),
            "--split", "all", "--max-steps", "1"]
    assert main([*base, "--out", str(tmp_path / "o"), "--warm-start-labels", "commit"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:2: field 'reasoning'" in err[0] and "same reasoning as 'a'" in err[0], err
    assert not (tmp_path / "o").exists()
    # the gold labels are what both rules train on without true_probs; sample does not refuse them
    task = load_task(str(path), "all", reasoning=True)
    assert warm_start_labels(task, rule="sample") == ["Yes", "No"]


@pytest.mark.parametrize("values", [{"method": "grpo", "warm_start_labels": "commit"},
                                    {"method": "sft", "warm_start_labels": "commit"}])
def test_commit_is_for_the_reasoning_warm_start_only(values):
    with pytest.raises(ConfigError, match="`warm_start_labels` applies to the reasoning warm start"):
        TrainConfig(**values)


@pytest.mark.slow
def test_a_committed_warm_start_runs_end_to_end_on_the_tiny_qwen3(tiny_qwen3_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "warm"
    assert main(["train", "--model", str(tiny_qwen3_dir), "--out", str(out), *FLAGS, "--max-steps", "2",
                 "--save-steps", "1", "--warm-start-labels", "commit", "--select-split", "test", "--select-limit", "4",
                 "--max-completion-length", "8", "--select-criterion", "last"]) == 0
    assert yaml.safe_load((out / "config.resolved.yaml").read_text())["warm_start_labels"] == "commit"
    env = json.loads((out / "env.json").read_text())
    assert env["warm_start_labels"]["rule"] == "commit"
    assert env["warm_start_labels"]["description"].startswith("the option with the larger true probability")
    state = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in state.items())
    # the confidence curve over checkpoints: each scored checkpoint has its mean confidence and truth metrics
    selection = json.loads((out / "selection.json").read_text())
    assert [c["step"] for c in selection["checkpoints"]] == [1, 2]
    assert all({"mean_confidence", "tce", "mean_overconfidence", "valid_rate"} <= set(c) for c in selection["checkpoints"])
    # `last`: the final checkpoint is the adapter GRPO continues, whatever the scores
    assert (selection["criterion"], selection["best"]) == ("last", 2)
    best, final = (load_file(str(out / d / "adapter_model.safetensors")) for d in ("best_adapter", "checkpoint-2"))
    assert best.keys() == final.keys() and all(best[k].equal(final[k]) for k in final)
    # the hedging default records its rule too
    hedge = tmp_path / "hedge"
    assert main(["train", "--model", str(tiny_qwen3_dir), "--out", str(hedge), *FLAGS, "--max-steps", "1"]) == 0
    assert json.loads((hedge / "env.json").read_text())["warm_start_labels"]["rule"] == "sample"
