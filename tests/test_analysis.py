"""Tests for the diagnosis experiments (issue #7): rollout confidence spread and reasoning swap."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import pytest

from decal.analysis._common import derive_seed
from decal.analysis.rollouts import RolloutConfig, rollout_rows, rollouts_table, run_rollouts, summarize_rollouts
from decal.analysis.swap import (
    ReasoningParts,
    SwapConfig,
    choose_donor,
    closing_token_ids,
    greedy_row,
    run_swap,
    split_reasoning,
    summarize_swaps,
    swapped_ids,
    swapped_prompt,
    swaps_table,
)
from decal.decision import Decision, DecisionTokens
from decal.errors import ConfigError
from decal.records import check_resume
from decal.recording import RunFields
from decal.tasks.builtin import load_builtin
from decal.tasks.schema import DecisionExample

LABELS = ("Safe", "Unsafe")
TOKENS = DecisionTokens(labels=LABELS, token_ids=(10, 20), tokens=("Safe", "Un"))
RUN = RunFields(task="t", split="train")


def _gen(option: int, probs, *, completion="<think>x</think>\nSafe"):
    """A hand-made GeneratedDecision: `option` -1 is an invalid (forced) decision."""
    return SimpleNamespace(
        completion_ids=[1, 2, 3],
        completion=completion,
        decision=Decision(index=2 if option >= 0 else -1, option=option),
        option_probs=list(probs),
        emitted_token=LABELS[option] if option >= 0 else None,
        valid=option >= 0,
        forced=option < 0,
        top_token="x",
        top_token_id=TOKENS.token_ids[option] if option >= 0 else 99,
    )


def _example(i: str, label: str):
    return DecisionExample(id=i, labels=LABELS, label=label)


# --- rollouts: counting -------------------------------------------------------------------------


def _hand_rows():
    q1 = rollout_rows(
        _example("q1", "Safe"),
        [_gen(0, [0.995, 0.004]), _gen(0, [0.99, 0.01]), _gen(1, [0.001, 0.999]), _gen(-1, [0.3, 0.2])],
        TOKENS, run=RUN,
    )
    q2 = rollout_rows(_example("q2", "Unsafe"), [_gen(1, [0.2, 0.8]), _gen(1, [0.0, 1.0])], TOKENS, run=RUN)
    return q1 + q2


def test_rollout_rows_fields_and_forced_decision():
    rows = _hand_rows()
    assert [r["id"] for r in rows] == ["q1#0", "q1#1", "q1#2", "q1#3", "q2#0", "q2#1"]
    invalid = rows[3]
    # forced decision: the argmax option, never correct, confidence the largest option prob
    assert invalid["prediction"] == "Safe" and not invalid["valid"] and not invalid["correct"]
    assert invalid["confidence"] == pytest.approx(0.3)
    assert rows[2]["prediction"] == "Unsafe" and rows[2]["confidence"] == pytest.approx(0.999)
    assert not rows[2]["correct"] and rows[0]["correct"]


def test_summarize_rollouts_hand_counts():
    s = summarize_rollouts(_hand_rows(), threshold=0.99)
    # valid: q1#0 (0.995 correct), q1#1 (0.99 correct, not strictly above), q1#2 (0.999 wrong),
    # q2#0 (0.8 correct), q2#1 (1.0 correct); invalid: q1#3
    assert (s["n_queries"], s["n_rollouts"], s["n_valid"], s["n_invalid"]) == (2, 6, 5, 1)
    assert (s["n_correct"], s["n_wrong"]) == (4, 1)
    assert (s["n_above"], s["n_above_correct"], s["n_above_wrong"]) == (3, 2, 1)
    assert s["share_above"] == pytest.approx(3 / 5)
    assert s["share_above_correct"] == pytest.approx(2 / 4)
    assert s["share_above_wrong"] == pytest.approx(1.0)
    assert s["share_above_of_all"] == pytest.approx(3 / 6)
    assert s["invalid_rate"] == pytest.approx(1 / 6)
    assert s["n_invalid_above"] == 0 and s["share_above_forced"] == 0.0
    per = {q["id"]: q for q in s["per_query"]}
    assert per["q1"]["share_above"] == pytest.approx(2 / 3) and per["q2"]["share_above"] == pytest.approx(1 / 2)
    assert s["mean_query_share"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # the counts add up
    assert s["n_valid"] + s["n_invalid"] == s["n_rollouts"] == sum(q["n"] for q in s["per_query"])
    assert s["n_above_correct"] + s["n_above_wrong"] == s["n_above"]


def test_summarize_rollouts_all_invalid_gives_nan_shares():
    rows = rollout_rows(_example("q", "Safe"), [_gen(-1, [0.5, 0.1])] * 3, TOKENS, run=RUN)
    s = summarize_rollouts(rows)
    assert s["n_invalid"] == 3 and s["invalid_rate"] == 1.0
    assert math.isnan(s["share_above"]) and math.isnan(s["mean_query_share"])
    assert "n/a" in rollouts_table([("t", s)])


def test_rollouts_table_prints_percent_like_the_paper():
    table = rollouts_table([("openai_moderation", summarize_rollouts(_hand_rows()))])
    assert "| openai_moderation | 2 | 6 | 60.00% | 50.00% | 100.00% | 16.67% | 58.33% |" in table


def test_rollout_config_rejects_bad_values():
    with pytest.raises(ValueError, match="samples"):
        RolloutConfig(samples=0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="threshold"):
        RolloutConfig(threshold=1.0)


# --- swap: pure pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head, expected",
    [
        ("<think>\nIt is rude.\n</think>\n\n", ReasoningParts("<think>\n", "It is rude.", "\n</think>\n\n")),
        ("It is fine. </think>\n", ReasoningParts("", "It is fine.", " </think>\n")),
        ("  <think>a b</think>", ReasoningParts("  <think>", "a b", "</think>")),
        ("<think>\n\n</think>\n", ReasoningParts("<think>\n\n", "", "</think>\n")),
        ("no marker here", None),
        ("<think>x</think> Safe", None),
    ],
)
def test_split_reasoning(head, expected):
    parts = split_reasoning(head)
    assert parts == expected
    if parts is not None:
        assert parts.opening + parts.reasoning + parts.closing == head


def test_greedy_row_cuts_valid_and_forced_completions():
    tok = SimpleNamespace(decode=lambda ids, **kw: "".join(map(chr, ids)))
    text = "<think>\nrude\n</think>\n\nU"
    valid = SimpleNamespace(
        completion_ids=[ord(c) for c in text], completion=text, decision=Decision(index=len(text) - 1, option=1),
        option_probs=[0.01, 0.98], emitted_token="U", valid=True, forced=False, top_token="Un", top_token_id=20,
    )
    row = greedy_row(_example("e", "Safe"), valid, TOKENS, tok, run=RUN, marker="</think>")
    assert (row["opening"], row["reasoning"], row["closing"]) == ("<think>\n", "rude", "\n</think>\n\n")
    assert row["closing_ids"] == [ord(c) for c in "\n</think>\n\n"]
    assert row["prediction"] == "Unsafe" and row["valid"] and not row["forced"] and row["confidence"] == 0.98
    forced = SimpleNamespace(
        completion_ids=[1], completion="It is fine", decision=Decision(-1, -1),
        option_probs=[0.7, 0.2], emitted_token=None, valid=False, forced=True, top_token="x", top_token_id=99,
    )
    row = greedy_row(_example("e", "Safe"), forced, TOKENS, tok, run=RUN, marker="</think>")
    # the forced decision appended the marker and a newline; the cut mirrors it
    assert (row["opening"], row["reasoning"], row["closing"]) == ("", "It is fine", "</think>\n")
    assert row["closing_ids"] is None  # the forced suffix was never generated: no ids of the model's own
    assert row["prediction"] == "Safe" and not row["valid"] and not row["correct"] and row["confidence"] == 0.7


def test_closing_ids_are_the_models_own_tail_or_none():
    vocab = {1: "<think>\nok.", 2: "\n</think>", 3: "\n\n", 4: "ok.\n", 5: "</think>\n\n"}
    tok = SimpleNamespace(decode=lambda ids, **kw: "".join(vocab[i] for i in ids))
    assert closing_token_ids([1, 2, 3], "\n</think>\n\n", tok) == [2, 3]
    # the reasoning and the closing share token 4: no tail decodes to the closing exactly
    assert closing_token_ids([4, 5], "\n</think>\n\n", tok) is None


def test_swap_scores_the_models_own_closing_tokens_on_smollm2():
    """SmolLM2 emits `</think>` then two single newlines; the text re-encoded in one piece ends in
    one `\n\n` token instead. The swapped sequence must end in the model's own ids."""
    from decal.models import load_tokenizer
    from decal.scoring import encode_prompts

    tok = load_tokenizer("smollm2-135m-instruct")
    own_closing = tok.convert_tokens_to_ids(["Ċ", "</", "think", ">", "Ċ", "Ċ"])
    head_ids = encode_prompts(tok, ["<think>\ngreat +: 1 positive."])[0] + own_closing
    parts = split_reasoning(tok.decode(head_ids))
    closing = closing_token_ids(head_ids, parts.closing, tok)
    assert closing == own_closing
    recipient = {"opening": parts.opening, "reasoning": parts.reasoning, "closing": parts.closing, "closing_ids": closing}
    donor = {"reasoning": "awful -: 1 negative."}
    prompt = "<|im_start|>user\nverdicts: awful<|im_end|>\n<|im_start|>assistant\n"
    text = swapped_prompt(prompt, recipient, donor)
    ids = swapped_ids(tok, prompt, recipient, donor, text)
    assert ids[-len(own_closing):] == own_closing and tok.decode(ids) == text
    assert encode_prompts(tok, [text])[0][-len(own_closing):] != own_closing  # why the ids are kept
    # without closing ids (older records, forced decisions), the text in one piece
    assert swapped_ids(tok, prompt, {**recipient, "closing_ids": None}, donor, text) == encode_prompts(tok, [text])[0]


def test_choose_donor_picks_another_label_deterministically():
    candidates = {f"e{i}": LABELS[i % 2] for i in range(20)}
    for rid in ("e0", "e3", "x"):
        pred = candidates.get(rid, "Safe")
        donor = choose_donor(rid, pred, candidates, seed=1)
        assert donor != rid and candidates[donor] != pred
        # same seed, id and candidate set (in any order) -> same donor
        shuffled = dict(reversed(list(candidates.items())))
        assert choose_donor(rid, pred, shuffled, seed=1) == donor
    # the choice varies with the seed (over several seeds, more than one donor is picked)
    assert len({choose_donor("e0", "Safe", candidates, seed=s) for s in range(10)}) > 1
    assert choose_donor("e0", "Safe", {"e0": "Unsafe", "e2": "Safe"}, seed=0) is None


def test_swapped_prompt_holds_question_and_donor_reasoning():
    recipient = {"opening": "<think>\n", "reasoning": "mine", "closing": "\n</think>\n\n"}
    donor = {"reasoning": "It threatens someone."}
    text = swapped_prompt("<user>Is 'hi' safe?</user>", recipient, donor)
    assert text == "<user>Is 'hi' safe?</user><think>\nIt threatens someone.\n</think>\n\n"
    assert "mine" not in text


def test_summarize_swaps_hand_counts():
    greedy = [{"valid": True}] * 4 + [{"valid": False}]
    base = {"swapped": True, "original_prediction": "Safe", "valid": True}
    swaps = [
        {**base, "prediction": "Unsafe", "flipped": True, "confidence": 0.999, "constrained_flipped": True},
        {**base, "prediction": "Unsafe", "flipped": True, "confidence": 0.7, "constrained_flipped": True},
        {**base, "prediction": "Safe", "flipped": False, "confidence": 0.95, "constrained_flipped": False},
        {"swapped": False},
    ]
    s = summarize_swaps(greedy, swaps, min_confidence=0.99)
    assert (s["n_examples"], s["n_greedy_valid"], s["n_greedy_invalid"]) == (5, 4, 1)
    assert (s["n_eligible"], s["n_swapped"], s["n_no_donor"], s["n_flipped"]) == (4, 3, 1, 2)
    assert (s["n_kept"], s["n_other"], s["n_invalid_after"]) == (1, 0, 0)
    assert s["flip_rate"] == pytest.approx(2 / 3) == s["flip_rate_constrained"]
    assert s["median_flipped_confidence"] == pytest.approx((0.999 + 0.7) / 2)
    assert s["share_flipped_at_or_above"] == pytest.approx(0.5)
    assert "| 66.67% | 0.8495 |" in swaps_table([("t", s)])


def test_run_settings_mismatch_is_refused(tmp_path):
    check_resume(tmp_path, {"samples": 4, "model": "m"})
    check_resume(tmp_path, {"samples": 4, "model": "m"})
    with pytest.raises(ConfigError, match="samples: 4 -> 8"):
        check_resume(tmp_path, {"samples": 8, "model": "m"})


def test_derive_seed_is_stable():
    # a fixed value: the seed must not depend on the process (PYTHONHASHSEED)
    assert derive_seed(0, "train-0001") == int.from_bytes(hashlib.sha256(b"0:train-0001").digest()[:4], "big") & 0x7FFFFFFF
    assert derive_seed(0, "a") != derive_seed(1, "a")


# --- tiny Qwen3 end to end: a scripted model ----------------------------------------------------
#
# A random tiny model almost never writes `</think>`, so the end-to-end tests steer the tiny
# Qwen3's output head with a forward hook: it writes a fixed reasoning per review, then decides
# from the reasoning text it sees (as the paper says real models do), with a confidence set by
# the reasoning. Everything else (generation, decision position, option probabilities, forced
# decisions, the swap's forward pass) is decal's own scoring code on the real Qwen3 tokenizer.

ASSISTANT = [151644, 77091, 198]  # "<|im_start|>assistant\n" in the Qwen3 tokenizer


class _Script:
    """Forward hooks that make a causal LM follow a script (see the block comment above).

    A pre-hook on the model keeps each row's token history (a pass without a filled cache
    starts it again; a pass with a cache extends it); a hook on the output head replaces the
    logits at every returned position by the script's choice in that position's context.
    """

    def __init__(self, model, tokenizer):
        self.tok = tokenizer
        self.history: list[list[int]] = []
        self.before: list[list[int]] = []
        self.inputs: list[list[int]] = []
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.options = [tokenizer.convert_tokens_to_ids(t) for t in ("Positive", "Negative")]
        self.handles = [
            model.register_forward_pre_hook(self._track, with_kwargs=True),
            model.get_output_embeddings().register_forward_hook(self._steer),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()

    def _track(self, module, args, kwargs):
        self.inputs = kwargs["input_ids"].tolist()
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        fresh = cache is None or cache.get_seq_length() == 0
        self.before = [[] for _ in self.inputs] if fresh else self.history
        self.history = [b + i for b, i in zip(self.before, self.inputs)]

    @staticmethod
    def plan(review: str) -> tuple[str, bool]:
        """The scripted reasoning of a review; a third of the reviews never close the reasoning."""
        h = int(hashlib.sha256(review.encode()).hexdigest(), 16)
        if h % 3 == 0:
            return "<think>\nHmm", False
        return f"<think>\nThe review sounds {'good' if h % 2 else 'bad'}{', surely' if h % 5 < 3 else ''}.\n</think>\n\n", True

    def _next(self, ids: list[int]):
        """(token id to emit, None) for scripted text, or (None, option probabilities) to decide."""
        ids = [t for t in ids if t != self.tok.pad_token_id]  # padding is masked in the model
        starts = [j for j in range(len(ids) - 2) if ids[j : j + 3] == ASSISTANT]
        if not starts:  # inside a prompt: nobody reads this position
            return self.eos, None
        prompt, comp = ids[: starts[-1] + 3], ids[starts[-1] + 3 :]
        text = self.tok.decode(comp, skip_special_tokens=False)
        if "</think>" in text:
            reasoning, after = text.split("</think>", 1)
            if after.strip():
                return self.eos, None
            conf = 0.999 if "surely" in reasoning else 0.9 if ("good" in reasoning or "bad" in reasoning) else 0.6
            return None, (conf, 1 - conf) if "bad" not in reasoning else (1 - conf, conf)
        review = self.tok.decode(prompt).split("Review:")[-1].split("<|im_end|>")[0].strip()
        target = self.tok(self.plan(review)[0], add_special_tokens=False)["input_ids"]
        return (target[len(comp)] if len(comp) < len(target) else self.eos), None

    def _steer(self, module, inputs, output):
        import torch

        out = torch.full_like(output, -1e4)
        n_out = output.shape[1]
        for b, (before, fed) in enumerate(zip(self.before, self.inputs)):
            for t in range(n_out):
                # output position t reads the context up to input position len(fed) - n_out + t
                token, probs = self._next(before + fed[: len(fed) - n_out + t + 1])
                if token is not None:
                    out[b, t, token] = 0.0
                else:
                    for tid, p in zip(self.options, probs):
                        out[b, t, tid] = math.log(p)
        return out


@pytest.fixture
def scripted_qwen3(tiny_qwen3, qwen3_tokenizer):
    script = _Script(tiny_qwen3, qwen3_tokenizer)
    yield tiny_qwen3, qwen3_tokenizer
    script.remove()


def _lines(path) -> list[str]:
    # distinct lines: a query redone after a crash may repeat its (identical) rows
    return sorted(set(path.read_text().splitlines()))


def _builtin(n: int):
    return load_builtin("train", n=n, reasoning=True)


@pytest.mark.slow  # about 20 s on 2 shared cores: nine rollouts generated three times
def test_rollouts_tiny_qwen3_counts_and_resume(scripted_qwen3, tmp_path):
    model, tok = scripted_qwen3
    task = _builtin(6)
    config = RolloutConfig(samples=3, max_new_tokens=16, limit=3, seed=3, batch_size=3)
    first = run_rollouts(model, tok, task, tmp_path / "a", config=config, model_name="tiny")
    rows = [json.loads(line) for line in (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == first["n_rollouts"] == 9 and first["n_queries"] == 3
    assert first["n_valid"] + first["n_invalid"] == 9 and first["n_correct"] + first["n_wrong"] == first["n_valid"]
    # the script's decision is valid exactly when it closes its reasoning; confidences are its own
    for r in rows:
        closes = _Script.plan(task.examples[int(r["example_id"][-4:])].input)[1]
        assert r["valid"] == closes
        expected = {0.999, 0.9} if closes else {0.6}
        assert any(r["confidence"] == pytest.approx(c, abs=1e-4) for c in expected)
    # a resumed run (one query missing) and a fresh run give the same report
    lines = (tmp_path / "a" / "rollouts.jsonl").read_text().splitlines(keepends=True)
    # query 1 whole, query 2 with one of its lines and a torn one, query 3 missing
    (tmp_path / "a" / "rollouts.jsonl").write_text("".join(lines[:4]) + lines[4][:20])
    resumed = run_rollouts(model, tok, task, tmp_path / "a", config=config, model_name="tiny")
    fresh = run_rollouts(model, tok, task, tmp_path / "b", config=config, model_name="tiny")
    assert json.dumps(resumed) == json.dumps(first) == json.dumps(fresh)  # NaN-safe equality
    assert _lines(tmp_path / "a" / "rollouts.jsonl") == _lines(tmp_path / "b" / "rollouts.jsonl")
    for name in ("summary.json", "table.md", "rollout_confidence.png", "rollout_confidence.svg"):
        assert (tmp_path / "a" / name).stat().st_size > 0


def test_swap_tiny_qwen3_flips_and_is_reproducible(scripted_qwen3, tmp_path):
    model, tok = scripted_qwen3
    task = _builtin(8)
    config = SwapConfig(min_confidence=0.99, max_new_tokens=16, seed=5, batch_size=8)
    summary = run_swap(model, tok, task, tmp_path / "a", config=config, model_name="tiny")
    greedy = {g["id"]: g for g in map(json.loads, (tmp_path / "a" / "greedy.jsonl").read_text().splitlines())}
    swaps = [json.loads(line) for line in (tmp_path / "a" / "swaps.jsonl").read_text().splitlines()]
    eligible = [g for g in greedy.values() if g["valid"] and g["confidence"] >= 0.99]
    assert len(greedy) == 8 and summary["n_eligible"] == len(eligible) == len(swaps) > 0
    assert summary["n_swapped"] + summary["n_no_donor"] == summary["n_eligible"]
    done = [s for s in swaps if s["swapped"]]
    assert done and summary["n_flipped"] + summary["n_kept"] + summary["n_other"] + summary["n_invalid_after"] == len(done)
    for s in done:
        donor, own = greedy[s["donor_id"]], greedy[s["id"]]
        assert s["donor_label"] == donor["prediction"] != own["prediction"]
        # the swapped prompt holds the original question and the donor's reasoning, not its own
        example = next(ex for ex in task.examples if ex.id == s["id"])
        assert example.input in s["swapped_prompt"] and donor["reasoning"] in s["swapped_prompt"]
        assert s["swapped_prompt"].endswith(own["closing"])
    # the scripted model follows the reasoning it is given, so every swap flips, at its confidence
    assert summary["flip_rate"] == 1.0 == summary["flip_rate_constrained"]
    assert all(
        s["confidence"] == pytest.approx(0.999 if "surely" in greedy[s["donor_id"]]["reasoning"] else 0.9, abs=1e-4)
        for s in done
    )
    # same seed: the same report; rerun in place: nothing recomputed, same report
    again = run_swap(model, tok, task, tmp_path / "b", config=config, model_name="tiny")
    rerun = run_swap(model, tok, task, tmp_path / "a", config=config, model_name="tiny")
    assert json.dumps(again) == json.dumps(summary) == json.dumps(rerun)
    assert _lines(tmp_path / "a" / "swaps.jsonl") == _lines(tmp_path / "b" / "swaps.jsonl")
    for name in ("summary.json", "table.md", "flipped_confidence.png", "flipped_confidence.svg"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    # with include_invalid, the forced decisions (reasoning never closed, confidence 0.6) take part
    loose = SwapConfig(min_confidence=0.5, max_new_tokens=16, seed=5, batch_size=8, include_invalid=True)
    (tmp_path / "c").mkdir()  # the greedy pass does not depend on include_invalid: reuse it
    (tmp_path / "c" / "greedy.jsonl").write_text((tmp_path / "a" / "greedy.jsonl").read_text())
    wide = run_swap(model, tok, task, tmp_path / "c", config=loose, model_name="tiny")
    forced = [g for g in greedy.values() if not g["valid"]]
    assert forced and wide["n_eligible"] == len(greedy) and wide["n_greedy_invalid"] == len(forced)
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "c" / "swaps.jsonl").read_text().splitlines())}
    for g in forced:
        assert rows[g["id"]]["swapped_prompt"].endswith("</think>\n")


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_analyze_help_parses(capsys):
    from decal.cli import main

    for sub in ("rollouts", "swap"):
        assert main(["analyze", sub, "--help"]) == 0
        assert "--out" in capsys.readouterr().out
    assert main(["analyze", "rollouts", "--model", "m", "--task", "builtin", "--split", "train"]) == 2  # no --out


@pytest.mark.slow  # about 15 s: three model loads through the CLI
def test_cli_analyze_on_tiny_qwen3(tiny_qwen3_dir, tmp_path, capsys):
    from decal.cli import main

    common = ["--model", str(tiny_qwen3_dir), "--task", "builtin", "--split", "train", "--no-progress"]
    rollouts = ["analyze", "rollouts", *common, "--samples", "2", "--max-new-tokens", "3", "--limit", "2"]
    assert main([*rollouts, "--out", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    # a random tiny model never writes the marker: every rollout is counted, as invalid
    assert (summary["n_rollouts"], summary["n_invalid"], summary["invalid_rate"]) == (4, 4, 1.0)
    assert "| builtin | 2 | 4 |" in capsys.readouterr().out
    # resuming with other settings is refused in one line, naming the setting
    assert main([*rollouts[:-4], "--samples", "3", "--max-new-tokens", "3", "--out", str(tmp_path / "r")]) == 1
    assert "samples: 2 -> 3" in capsys.readouterr().err
    swap = ["analyze", "swap", *common, "--limit", "4", "--max-new-tokens", "3", "--min-confidence", "0", "--include-invalid"]
    assert main([*swap, "--out", str(tmp_path / "s")]) == 0
    first = (tmp_path / "s" / "summary.json").read_text()
    s = json.loads(first)
    assert s["n_examples"] == 4 and s["n_eligible"] == 4 and s["n_swapped"] + s["n_no_donor"] == 4
    assert main([*swap, "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "summary.json").read_text() == first


# --- the real SmolLM2-135M-Instruct -------------------------------------------------------------


@pytest.mark.slow  # about a minute on 2 shared cores
def test_smollm2_rollouts_and_swap_small(smollm2, tmp_path):
    model, tok = smollm2
    task = _builtin(4)
    r = run_rollouts(model, tok, task, tmp_path / "r", config=RolloutConfig(samples=2, max_new_tokens=8, limit=2))
    assert r["n_rollouts"] == 4 and r["n_queries"] == 2
    assert r["n_valid"] + r["n_invalid"] == 4 and r["n_correct"] + r["n_wrong"] == r["n_valid"]
    assert r["n_above"] == r["n_above_correct"] + r["n_above_wrong"] <= r["n_valid"]
    # SmolLM2 rarely writes the marker, so the swap takes its forced decisions too
    config = SwapConfig(min_confidence=0.0, max_new_tokens=8, limit=4, seed=2, include_invalid=True)
    s = run_swap(model, tok, task, tmp_path / "s", config=config)
    greedy = {g["id"]: g for g in map(json.loads, (tmp_path / "s" / "greedy.jsonl").read_text().splitlines())}
    swaps = [json.loads(line) for line in (tmp_path / "s" / "swaps.jsonl").read_text().splitlines()]
    assert s["n_examples"] == 4 and s["n_swapped"] + s["n_no_donor"] == s["n_eligible"] == len(swaps)
    assert s["n_flipped"] + s["n_kept"] + s["n_other"] + s["n_invalid_after"] == s["n_swapped"]
    for row in (w for w in swaps if w["swapped"]):
        donor = greedy[row["donor_id"]]
        assert donor["prediction"] == row["donor_label"] != row["original_prediction"]
        question = next(ex.input for ex in task.examples if ex.id == row["id"])
        assert question in row["swapped_prompt"] and donor["reasoning"] in row["swapped_prompt"]
    # a rerun with the same settings reads what is there and gives the same report
    assert json.dumps(run_swap(model, tok, task, tmp_path / "s", config=config)) == json.dumps(s)
    again = run_rollouts(model, tok, task, tmp_path / "r", config=RolloutConfig(samples=2, max_new_tokens=8, limit=2))
    assert json.dumps(again) == json.dumps(r)
