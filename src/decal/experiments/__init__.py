"""Experiment grids: configs, step plans, the resumable runner, the results table and reports."""

from .config import ExperimentConfig, experiment_config_from_dict, load_experiment_config
from .plan import Step, build_plan
from .report import build_tables, write_report
from .results import read_results
from .runner import run_experiment

__all__ = [
    "ExperimentConfig",
    "Step",
    "build_plan",
    "build_tables",
    "experiment_config_from_dict",
    "load_experiment_config",
    "read_results",
    "run_experiment",
    "write_report",
]
