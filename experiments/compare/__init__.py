"""The compare command, ``python -m experiments.compare`` (its usage: :mod:`experiments.compare.__main__`), one job
per module:

- :mod:`~experiments.compare.settings`: :class:`CompareSettings` of ``--config`` (with :class:`RealPhotos`) and
  :func:`load_compare_settings`;
- :mod:`~experiments.compare.methods`: :class:`Method`, a row of the ``--config`` comparison, and its label;
- :mod:`~experiments.compare.pipeline`: :func:`run_compare`, which makes the data (and converts the real photos),
  trains, scores every method on each test file (through :mod:`experiments.evaluation`) and writes the report, and
  :func:`log_wandb_runs`;
- :mod:`~experiments.compare.finished_runs`: finished runs for ``--runs`` and ``--wandb`` (:class:`FinishedRun`,
  :func:`collect_run_dirs`, :func:`read_run`, :func:`common_test_file`) and :func:`compare_runs`, their report;
- :mod:`~experiments.compare.stats`: :func:`table_rows` (bootstrap intervals, paired differences; the balanced
  landmark NME's interval), :func:`paired_difference`, :func:`contrast_rows` (a config's ``contrasts``),
  :func:`seed_mean_table`, :func:`shared_positions`;
- :mod:`~experiments.compare.report`: ``table.md``, ``table.csv``, ``contrasts.csv``, ``runs.csv`` and the figures;
- :mod:`~experiments.compare.__main__`: :func:`main`, the command line.
"""

from experiments.compare.finished_runs import compare_runs
from experiments.compare.pipeline import run_compare
from experiments.compare.settings import CompareSettings, load_compare_settings

__all__ = ["CompareSettings", "compare_runs", "load_compare_settings", "main", "run_compare"]


def __getattr__(name: str):
    """``main`` from :mod:`experiments.compare.__main__`, imported on first use: importing it here, with the package,
    would make ``python -m experiments.compare`` warn that the module it runs was imported before."""
    if name == "main":
        from experiments.compare.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
