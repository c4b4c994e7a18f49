"""Paper-style reports (issue #8): tables in the paper's layouts, Markdown and offline HTML."""

from __future__ import annotations

import re

import pytest

from decal.cli import main
from decal.experiments.config import experiment_config_from_dict
from decal.experiments.report import build_tables, write_report
from decal.experiments.runner import run_experiment
from test_experiments import FakeDecal, tiny_config


@pytest.fixture()
def experiment(tmp_path):
    config = experiment_config_from_dict(tiny_config())
    root = tmp_path / "exp"
    run_experiment(config, out=root, executor=FakeDecal())
    return root


def test_tables_follow_the_paper_layouts(experiment):
    tables, notes = build_tables(experiment)
    by_key = {t.key: t for t in tables}
    assert set(by_key) == {"table1", "table4", "table5", "table6", "table7", "table8"}
    assert any("Table 9 omitted" in n for n in notes)
    t4 = by_key["table4"]
    assert t4.header == ("Dataset", "Method", "m1 Acc (↑)", "m1 ECE (↓)")
    # Rows: dataset (marked † in-domain, * OOD) x method, Ours last; ECE 0.2 -> 20.00.
    assert [r[:2] for r in t4.rows] == [("builtin †", "Base"), ("", "SFT"), ("", "Ours"), ("other *", "Base"), ("", "SFT"), ("", "Ours")]
    assert all(r[3] == "20.00" for r in t4.rows)
    assert "95% CI [10.00, 30.00]" in t4.tips[0][3]
    # Table 1 leaves the calibration-aware method out.
    assert [r[1] for r in by_key["table1"].rows] == ["Base", "SFT", "Base", "SFT"]
    # Table 5: None and Platt rows, columns per dataset for Ours only (no GRPO in this grid).
    t5 = by_key["table5"]
    assert [r[1] for r in t5.rows] == ["None", "Platt"]
    assert t5.header[2:] == ("builtin † Ours", "other * Ours")
    # Table 8: the main cal-grpo run and the lambda=0.005 variant, in increasing lambda.
    t8 = by_key["table8"]
    assert t8.rows[1][1] == "0.005" and t8.rows[0][0] == "builtin †"
    assert by_key["table6"].header[2:] == ("m1 SCE (↓)", "m1 MCE (↓)")
    assert by_key["table7"].rows[0][2] == "75.00"


def test_markdown_and_html_reports(experiment):
    md = write_report(experiment, format="md").read_text()
    assert "| builtin † | Base |" in md
    assert "## Table 4" in md and "Table 9 omitted: no β sweep." in md
    md_ci = write_report(experiment, format="md", out=experiment / "ci.md", ci=True, figures=False).read_text()
    assert "20.00 [10.00, 30.00]" in md_ci
    html_path = write_report(experiment, format="html")
    html = html_path.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<table>") == 6
    assert "title='n=6, 95% CI [10.00, 30.00]'" in html
    # One file, readable offline: no external resources.
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", html)
    assert "<link" not in html and "<script" not in html
    # Figure 1: the reliability grid, embedded as base64 PNG; the Markdown links the file.
    assert html.count("src='data:image/png;base64,") == 1
    assert (experiment / "figures" / "reliability-m1.png").is_file()
    assert "![Figure 1: reliability diagrams and confidence distributions of m1](figures/reliability-m1.png)" in md


def test_report_cli_errors_and_output(experiment, tmp_path, capsys):
    assert main(["report", str(experiment), "--format", "html", "--no-figures"]) == 0
    assert (experiment / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an experiment folder" in err[0]
    assert main(["report", str(experiment), "--format", "pdf"]) == 2


def test_analysis_tables_2_and_3(tmp_path):
    analyses = [
        {"kind": "rollouts", "task": "builtin", "split": "train", "settings": {"samples": 4}},
        {"kind": "swap", "task": "builtin", "split": "train"},
    ]
    config = experiment_config_from_dict(tiny_config(analyses=analyses))
    root = tmp_path / "exp"
    fake = FakeDecal()
    run_experiment(config, out=root, executor=fake)
    rollouts = next(c for c in fake.calls if c[:2] == ["analyze", "rollouts"])
    assert rollouts[rollouts.index("--samples") + 1] == "4" and "--adapter" not in rollouts
    tables, _ = build_tables(root)
    by_key = {t.key: t for t in tables}
    assert by_key["table2"].rows == (("builtin (train), base", "97.50"),)
    assert by_key["table3"].rows == (("builtin (train), base", "50.00"),)


def test_an_undefined_metric_reads_n_a_and_a_missing_one_a_dash(experiment):
    """AUROC of a run whose predictions are all right is undefined (stored empty): "n/a", not
    "nan" or the "–" that marks a run that never happened."""
    import csv

    from rich.console import Console

    from decal.commands.report import results_table

    path = experiment / "results.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    first = next(r for r in rows if r["metric"] == "auroc" and r["calibrator"] == "none")
    first.update(value="", ci_low="", ci_high="")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tables, _ = build_tables(experiment)
    table7 = next(t for t in tables if t.key == "table7")
    assert table7.rows[0][2] == "n/a" and "nan" not in str(table7.rows)
    console = Console(record=True, width=200)
    console.print(results_table(experiment))
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in console.export_text().splitlines() if "│" in ln]
    row = next(c for c in cells if c[1] == first["method"] and c[2] == f"{first['eval_task']}/{first['eval_split']}")
    assert row[-2:] == ["n/a", "–"]  # auroc undefined; invalid_rate was never written by this fake grid
    assert "n/a undefined" in write_report(experiment, format="md", figures=False).read_text()


class _TruthFake(FakeDecal):
    """As FakeDecal, with the truth metrics that runs on the verdicts task get."""

    def __call__(self, argv, log_path):
        code = super().__call__(argv, log_path)
        if argv[0] == "metrics":
            path = __import__("pathlib").Path(argv[1]) / "metrics.json"
            report = __import__("json").loads(path.read_text())
            for key, value in (("tce", 0.123), ("mean_overconfidence", 0.05), ("mean_confidence", 0.9), ("bayes_accuracy", 0.78)):
                report["metrics"][key] = {"value": value, "ci_low": value - 0.01, "ci_high": value + 0.01}
            path.write_text(__import__("json").dumps(report))
        return code


def test_truth_tables_only_with_truth_metrics(tmp_path, experiment):
    assert not any(t.key.startswith("tableT") for t in build_tables(experiment)[0])
    config = experiment_config_from_dict(tiny_config())
    root = tmp_path / "truth"
    run_experiment(config, out=root, executor=_TruthFake())
    tables, _ = build_tables(root)
    by_key = {t.key: t for t in tables}
    t1 = by_key["tableT1"]
    assert t1.header == ("Dataset", "Method", "m1 Acc (↑)", "m1 ECE (↓)", "m1 TCE (↓)", "m1 Over", "m1 Conf", "m1 Bayes acc")
    methods = [row[1] for row in t1.rows[:4]]
    assert methods == ["Base", "SFT", "Ours", "Ours [lambda=0.005]"]  # sweep points too
    assert t1.rows[0][4:] == ("12.30", "5.00", "90.00", "78.00")
    t2 = by_key["tableT2"]
    assert t2.title.startswith("Table T2: true calibration error") and [r[1] for r in t2.rows] == ["None", "Platt"]
    assert "12.30" in t2.rows[1]


def test_lambda_table_holds_only_the_swept_entry_and_its_variants(tmp_path):
    """A second cal-grpo entry (another target, another lambda) is not a point of the lambda sweep."""
    data = tiny_config()
    data["methods"].append({"name": "cal-grpo-group", "method": "cal-grpo",
                            "train": {"max_steps": 2, "cal_lambda": 1.0, "cal_target": "group-accuracy"}})
    root = tmp_path / "exp"
    run_experiment(experiment_config_from_dict(data), out=root, executor=FakeDecal())
    by_key = {t.key: t for t in build_tables(root)[0]}
    # Per dataset: the main run (lambda 0.001) and its 0.005 variant; no third row at lambda 1.
    assert [r[1] for r in by_key["table8"].rows] == ["0.001", "0.005", "0.001", "0.005"]
    assert "Ours (cal-grpo-group)" in [r[1] for r in by_key["table4"].rows]


class _MassFake(FakeDecal):
    """As FakeDecal, with the label-mass metrics `decal metrics` writes since issue #23."""

    def __call__(self, argv, log_path):
        code = super().__call__(argv, log_path)
        if argv[0] == "metrics":
            path = __import__("pathlib").Path(argv[1]) / "metrics.json"
            report = __import__("json").loads(path.read_text())
            for key, value in (("mean_label_mass", 0.04), ("low_label_mass_share", 0.97)):
                report["metrics"][key] = {"value": value, "ci_low": value - 0.01, "ci_high": value + 0.01}
            path.write_text(__import__("json").dumps(report))
        return code


def test_label_mass_table_when_the_runs_have_it(tmp_path, experiment):
    assert any("Table L omitted" in n for n in build_tables(experiment)[1])
    root = tmp_path / "mass"
    run_experiment(experiment_config_from_dict(tiny_config()), out=root, executor=_MassFake())
    by_key = {t.key: t for t in build_tables(root)[0]}
    table = by_key["tableL"]
    assert table.header == ("Dataset", "Method", "m1 Label mass", "m1 < 50 %")
    assert table.rows[0][2:] == ("4.00", "97.00")
