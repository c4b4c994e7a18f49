"""The report's opening against a known truth (issue #22): the summary with intervals, the hedging and
committed conditions side by side, and the reliability diagrams against the truth."""

from __future__ import annotations

import json
from pathlib import Path

from decal.experiments.config import experiment_config_from_dict
from decal.experiments.headline import method_conditions
from decal.experiments.report import build_tables, write_report
from decal.experiments.runner import run_experiment
from test_experiments import FakeDecal, _flag, tiny_config

TRUTH = {"accuracy": 0.6, "ece": 0.1, "tce": 0.25, "mean_overconfidence": 0.15}


class _VerdictsFake(FakeDecal):
    """FakeDecal whose evaluations carry `true_probs` and whose metrics hold the truth metrics."""

    def __call__(self, argv, log_path):
        code = super().__call__(argv, log_path)
        if argv[0] == "evaluate":
            run = Path(_flag(argv, "--out")) / _flag(argv, "--name")
            lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
            with (run / "predictions.jsonl").open("w") as f:
                for i, rec in enumerate(lines):
                    f.write(json.dumps({**rec, "true_probs": [0.5 + 0.05 * i, 0.5 - 0.05 * i]}) + "\n")
        if argv[0] == "metrics":
            path = Path(argv[1]) / "metrics.json"
            report = json.loads(path.read_text())
            offset = 0.1 if "-commit" in argv[1] else 0.0  # the committed condition reads differently
            for key, value in TRUTH.items():
                report["metrics"][key] = {"value": value + offset, "ci_low": value + offset - 0.02,
                                          "ci_high": value + offset + 0.02}
            path.write_text(json.dumps(report))
        if argv[0] == "analyze":
            out = Path(_flag(argv, "--out"))
            summary = ({"share_above": 0.75, "n_above": 3, "n_valid": 4, "threshold": 0.99} if argv[1] == "rollouts"
                       else {"flip_rate": 0.5, "n_flipped": 2, "n_swapped": 4, "median_flipped_confidence": 0.93})
            (out / "summary.json").write_text(json.dumps(summary))
        return code


def _grid() -> dict:
    reasoning = {"reasoning": True}
    return tiny_config(
        methods=[
            {"name": "base", "method": "base", "reasoning": False},
            {"name": "sft", "method": "sft", "train": {"epochs": 1}},
            {"name": "warm", "method": "sft", **reasoning, "train": {"max_steps": 2}},
            {"name": "warm-commit", "method": "sft", **reasoning, "train": {"max_steps": 2, "warm_start_labels": "commit"}},
            {"name": "grpo", "method": "grpo", "init_from": "warm", "train": {"max_steps": 2}},
            {"name": "grpo-commit", "method": "grpo", "init_from": "warm-commit", "train": {"max_steps": 2}},
            {"name": "cal-grpo-commit", "method": "cal-grpo", "init_from": "warm-commit", "train": {"max_steps": 2}},
        ],
        calibrators=[],
        sweeps=[{"method": "cal-grpo-commit", "param": "cal_lambda", "values": [1.0]}],
        analyses=[{"kind": "rollouts", "task": "builtin", "split": "train", "methods": ["warm-commit", "grpo-commit"]},
                  {"kind": "swap", "task": "builtin", "split": "train", "methods": ["warm-commit"]}],
    )


def test_conditions_follow_the_init_from_chain_to_the_warm_start():
    config = experiment_config_from_dict(_grid())
    import dataclasses

    conditions = method_conditions({"config": dataclasses.asdict(config)})
    assert conditions == {"warm": "hedging", "grpo": "hedging", "warm-commit": "committed",
                          "grpo-commit": "committed", "cal-grpo-commit": "committed"}


def test_the_report_opens_with_the_two_conditions_then_the_truth_figures(tmp_path):
    root = tmp_path / "exp"
    run_experiment(experiment_config_from_dict(_grid()), out=root, executor=_VerdictsFake())
    tables, _ = build_tables(root)
    opening = tables[0]
    assert opening.key == "conditions"
    assert opening.header == ("Condition", "Method", "Dataset", "Acc", "ECE", "TCE [95% CI]", "Over [95% CI]",
                              "Valid rollouts > 0.99", "Swap flips", "Median conf. of flipped")
    in_domain = [r for r in opening.rows if r[2] == "builtin †"]
    assert [(r[0], r[1]) for r in in_domain] == [
        ("shared", "Base"), ("shared", "SFT"),
        ("committed", "SFT (warm-commit)"), ("committed", "GRPO (grpo-commit)"), ("committed", "Ours (cal-grpo-commit)"),
        ("committed", "Ours (cal-grpo-commit) [lambda=1]"),
        ("hedging", "SFT (warm)"), ("hedging", "GRPO"),
    ]
    warm_commit = next(r for r in in_domain if r[1] == "SFT (warm-commit)")
    # values and intervals in percent; the analyses on the in-domain row of the analysed methods only
    assert warm_commit[5:] == ("35.00 [33.00, 37.00]", "25.00 [23.00, 27.00]", "75.00 (3/4)", "50.00 (2/4)", "93.00")
    hedging = next(r for r in in_domain if r[1] == "GRPO")
    assert hedging[5] == "25.00 [23.00, 27.00]" and hedging[7:] == ("–", "–", "–")
    ood = next(r for r in opening.rows if r[2] == "other *" and r[1] == "SFT (warm-commit)")
    assert ood[7:] == ("–", "–", "–")

    md = write_report(root, format="md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[0].startswith("## The two conditions side by side")
    assert heads[1].startswith("## Reliability against the truth, the committed condition")
    assert heads[2].startswith("## Reliability against the truth, the hedging condition")
    assert heads[3].startswith("## Table 1")
    assert (root / "figures" / "truth-m1-committed.png").is_file()
    html = write_report(root, format="html").read_text()
    assert html.index("The two conditions side by side") < html.index("Reliability against the truth") < html.index("Table 1")


def test_without_warm_starts_the_opening_is_the_summary_with_intervals(tmp_path):
    root = tmp_path / "exp"
    run_experiment(experiment_config_from_dict(tiny_config(calibrators=[])), out=root, executor=_VerdictsFake())
    tables, _ = build_tables(root)
    assert tables[0].key == "summary"
    assert tables[0].header == ("Method", "Dataset", "Acc", "ECE", "TCE [95% CI]", "Over [95% CI]")
    assert [r[:2] for r in tables[0].rows] == [("Base", "builtin †"), ("Base", "other *"), ("SFT", "builtin †"),
                                               ("SFT", "other *"), ("Ours", "builtin †"), ("Ours", "other *")]
    assert tables[0].rows[0][2:] == ("60.00 [58.00, 62.00]", "10.00 [8.00, 12.00]", "25.00 [23.00, 27.00]", "15.00 [13.00, 17.00]")
    md = write_report(root, format="md").read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ")]
    assert heads[0].startswith("## Summary") and heads[1].startswith("## Reliability against the truth, each method")


def test_no_truth_no_opening(tmp_path):
    root = tmp_path / "exp"
    run_experiment(experiment_config_from_dict(tiny_config()), out=root, executor=FakeDecal())
    assert build_tables(root)[0][0].key == "table1"
