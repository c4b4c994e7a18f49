"""The report's opening against a known truth: the comparison that matters, with intervals, and its figures.

When some evaluation's records carry the true answer probabilities (the `verdicts` task), the
report opens with (issue #22):

- the summary (`summary`): accuracy, ECE, TCE and mean overconfidence with their 95 % bootstrap
  intervals for every main method, in-domain and out-of-domain;
- when the grid trains reasoning warm starts, the two conditions side by side (`conditions`)
  instead: *hedging* (warm-start labels drawn from the truth, `warm_start_labels: sample`) and
  *committed* (the label the rationale concludes, `commit`). A method belongs to the condition of
  the warm start its `init_from` chain starts from; methods without one (base, decision-token SFT)
  are listed once, as shared. Besides the four metrics, each method's row gives the share of its
  valid sampled rollouts with decision-token probability above 0.99 (`analyze rollouts`, the
  paper's Table 2), the swap flip rate and the median confidence of the flipped decisions
  (`analyze swap`, Table 3), where the grid analysed that method (on the in-domain row);
- reliability against the truth (`decal.plots.plot_truth_grid`): confidence against the true
  probability of the chosen option, methods side by side, datasets in rows; one figure per
  condition (committed first), or one of the main methods.
"""

from __future__ import annotations

from pathlib import Path

from .._io import read_json, safe_name
from .tables import MISSING, Dataset, ResultIndex, Table, method_label, percent

__all__ = ["CONDITIONS", "method_conditions", "headline_tables", "truth_figures"]

#: Warm-start label rule -> condition name, in the order the report shows them.
CONDITIONS = {"commit": "committed", "sample": "hedging"}
_METRICS = (("accuracy", "Acc"), ("ece", "ECE"), ("tce", "TCE [95% CI]"), ("mean_overconfidence", "Over [95% CI]"))


def method_conditions(experiment: dict) -> dict[str, str]:
    """Method name -> "committed" | "hedging", for the methods that descend from a reasoning warm start."""
    specs = {m["name"]: m for m in experiment["config"]["methods"]}
    out = {}
    for name in specs:
        root, seen = specs[name], {name}
        while root.get("init_from") and root["init_from"] in specs and root["init_from"] not in seen:
            seen.add(root["init_from"])
            root = specs[root["init_from"]]
        reasoning = root.get("reasoning")
        if root["method"] == "sft" and (reasoning if reasoning is not None else False):
            out[name] = CONDITIONS[(root.get("train") or {}).get("warm_start_labels", "sample")]
    return out


def _with_ci(index: ResultIndex, model: str, meth: dict, ds: Dataset, metric: str) -> tuple[str, str]:
    """A cell's value in percent with its interval, e.g. "24.10 [22.03, 26.21]", and its tooltip."""
    value, tip = index.get(model, meth["name"], meth.get("variant", ""), ds, metric)
    rows = index.rows(model, meth["name"], meth.get("variant", ""), ds, metric)
    text = percent(value)
    if len(rows) == 1 and rows[0]["ci_low"] is not None and value is not None:
        text += f" [{100 * rows[0]['ci_low']:.2f}, {100 * rows[0]['ci_high']:.2f}]"
    return text, tip


def _analyses(root: Path, experiment: dict) -> dict[tuple[str, str, str], dict]:
    """(model, method, kind) -> summary.json of each finished analysis."""
    out = {}
    for step in experiment["steps"]:
        info = step["info"]
        summary = root / step["id"] / "summary.json"
        if step["kind"] == "analyze" and (root / step["id"] / "DONE").is_file() and summary.is_file():
            out[(info["model"], info["method"], info["analysis"])] = read_json(summary)
    return out


def _analysis_cells(found: dict | None, kind: str) -> list[str]:
    if found is None:
        return [MISSING] * (1 if kind == "rollouts" else 2)
    if kind == "rollouts":
        return [f"{percent(found.get('share_above'))} ({found.get('n_above', 0)}/{found.get('n_valid', 0)})"]
    median = found.get("median_flipped_confidence")
    return [f"{percent(found.get('flip_rate'))} ({found.get('n_flipped', 0)}/{found.get('n_swapped', 0)})",
            percent(median)]


def _ordered(experiment: dict, conditions: dict[str, str]) -> list[tuple[str, dict]]:
    """(condition, method entry) rows: shared methods first, then committed, then hedging."""
    shared = [("shared", m) for m in experiment["methods"] if m["name"] not in conditions and not m["variant"]]
    grouped = [(c, m) for c in CONDITIONS.values() for m in experiment["methods"] if conditions.get(m["name"]) == c]
    return shared + grouped


def headline_tables(root: Path, experiment: dict, index: ResultIndex, models: list[str],
                    datasets: list[Dataset]) -> list[Table]:
    """The opening table (module docstring); none when no evaluation carries the truth."""
    if not any(key[-1] == "tce" for key in index.keys()):
        return []
    conditions = method_conditions(experiment)
    if conditions:
        rows_of = _ordered(experiment, conditions)
        analyses = _analyses(root, experiment)
        extra = ("Valid rollouts > 0.99", "Swap flips", "Median conf. of flipped")
        key, title = "conditions", ("The two conditions side by side (%): hedging (warm-start labels drawn from the "
                                    "truth) and committed (the label the rationale concludes); 95% bootstrap intervals")
    else:
        rows_of = [("", m) for m in experiment["methods"] if not m["variant"]]
        analyses, extra = {}, ()
        key = "summary"
        title = "Summary (%): accuracy, ECE, TCE and overconfidence against the truth, 95% bootstrap intervals"
    lead = ["Condition"] if conditions else []
    header = [*lead, "Method", "Dataset"] + [f"{m} {label}" if len(models) > 1 else label for m in models
                                             for _, label in _METRICS] + list(extra)
    rows, tips = [], []
    for condition, meth in rows_of:
        for ds in datasets:
            row, tip = [*([condition] if conditions else []), method_label(meth), ds.marked], [""] * (len(lead) + 2)
            for model in models:
                for metric, _ in _METRICS:
                    text, t = _with_ci(index, model, meth, ds, metric)
                    row.append(text)
                    tip.append(t)
            if extra:
                model = models[0]
                in_domain = ds.domain == "in" and not meth["variant"]
                for kind in ("rollouts", "swap"):
                    cells = _analysis_cells(analyses.get((model, meth["name"], kind)) if in_domain else None, kind)
                    row += cells
                    tip += [""] * len(cells)
            if any(c != MISSING for c in row[len(lead) + 2 : len(lead) + 2 + len(_METRICS)]):
                rows.append(tuple(row))
                tips.append(tuple(tip))
    if not rows:
        return []
    return [Table(key, title, tuple(header), tuple(rows), tuple(tips))]


def _truth_runs(root: Path, experiment: dict, index: ResultIndex, model: str, methods: list[dict],
                datasets: list[Dataset]) -> dict[tuple[str, str], list]:
    from ..records import read_records

    runs = {}
    for ds in datasets:
        for meth in methods:
            found = index.rows(model, meth["name"], meth.get("variant", ""), ds, "tce")
            if not found or not found[0].get("run_dir") or not (root / found[0]["run_dir"]).is_dir():
                continue
            records = read_records(root / found[0]["run_dir"])
            if records and records[0].true_probs is not None:
                runs[(ds.marked, method_label(meth))] = records
    return runs


def truth_figures(root: Path, experiment: dict, index: ResultIndex, models: list[str], datasets: list[Dataset],
                  *, n_bins: int = 10) -> list[tuple[str, Path]]:
    """The reliability diagrams against the truth (module docstring): [(caption, png path)]."""
    if not any(key[-1] == "tce" for key in index.keys()):
        return []
    from ..plots import plot_truth_grid

    conditions = method_conditions(experiment)
    main = [m for m in experiment["methods"] if not m["variant"]]
    groups = [(c, [m for m in main if conditions.get(m["name"]) == c]) for c in CONDITIONS.values()] if conditions \
        else [("", main)]
    figures = []
    for model in models:
        for condition, methods in groups:
            runs = _truth_runs(root, experiment, index, model, methods, datasets)
            if not runs:
                continue
            name = f"truth-{safe_name(model)}" + (f"-{condition}" if condition else "")
            path = root / "figures" / name
            what = f"the {condition} condition" if condition else "each method"
            caption = (f"Reliability against the truth, {what} ({model}): confidence vs the true probability of the "
                       f"chosen option")
            plot_truth_grid(runs, path, n_bins=n_bins, title=caption)
            figures.append((caption, path.with_suffix(".png")))
    return figures
