"""Finished training runs for ``--runs`` and ``--wandb``: :func:`collect_run_dirs` finds them (a run still
training is refused, a folder's unfinished trial left out), :func:`read_run` reads each, checked
(:class:`FinishedRun`), :func:`common_test_file` makes sure all were tested on one test file (by content), and
:func:`compare_runs` groups them (:func:`group_runs`) into the compare command's table and figures."""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from datamodules.datamodule import split_path
from experiments.compare.report import write_figures, write_run_list, write_tables
from experiments.compare.stats import seed_mean_table, table_rows
from experiments.config import ConfigError, flat_keys
from experiments.runs import LOCK_NAME, config_path, finished_metrics, lock_holder
from lightning_vrn.atomic import file_sha256
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.metrics.bootstrap import DEFAULT_RESAMPLES
from lightning_vrn.metrics.report import read_per_sample_csv, summarise
from lightning_vrn.models import DEFAULT_MODEL


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run: its directory, resolved ``config`` (config.yaml), ``metrics`` (metrics.json),
    ``table`` (the test stage's per-sample NME table, nme/test.csv), its ``summary`` (:func:`summarise` of the
    table), ``test_file`` (absolute path) and ``test_sha256``, that file's SHA-256 when its test recorded it
    (metrics.json's ``test_file_sha256``; None for a run tested before it was recorded)."""

    dir: Path
    config: DictConfig
    metrics: dict
    table: dict
    summary: dict
    test_file: Path
    test_sha256: str | None


def collect_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run directories ``paths`` name: each a run directory (it holds config.yaml) or a folder of them,
    such as a sweep's ``runs/sweeps/NAME``. A run still training (its ``run.lock`` held: :func:`_still_training`)
    is refused when named, and a folder's trial still training or unfinished (without metrics.json) is left out
    with a note on stderr."""
    found = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            training = _still_training(path)
            if training:
                raise ConfigError(f"run {path} is {training}; wait for it to finish, or leave it out of --runs")
            found.append(path)
            continue
        trials = sorted(config.parent for config in path.glob("*/config.yaml"))
        if not trials:
            raise ConfigError(f"{path} is neither a run directory (no config.yaml) nor a folder of run directories "
                              f"(such as runs/sweeps/NAME)")
        for trial in trials:
            training = _still_training(trial)
            if training:
                print(f"[compare] {trial}: {training}, left out", file=sys.stderr, flush=True)
            elif (trial / "metrics.json").is_file():
                found.append(trial)
            else:
                print(f"[compare] {trial}: not finished (no metrics.json), left out", file=sys.stderr, flush=True)
    unique = {path.resolve(): path for path in found}
    return list(unique.values())


def _still_training(run_dir: Path) -> str | None:
    """Who is still training ``run_dir`` (the holder of its ``run.lock``: a live process, or one on another host,
    which cannot be checked), None when no one is: its metrics.json may be an earlier attempt's."""
    holder = lock_holder(run_dir)
    if holder is None:
        return None
    unchecked = "" if holder.get("host") == socket.gethostname() else \
        f" (another host's: if it is gone, delete {run_dir / LOCK_NAME})"
    return (f"still training: {LOCK_NAME} is held by process {holder.get('pid')} on host {holder.get('host')} "
            f"since {holder.get('started')}{unchecked}")


def _retest_fix(run_dir: Path) -> str:
    """How to test a finished run again: its training resumed with its last attempt's config, which only tests."""
    return (f"delete {run_dir / 'metrics.json'} and test the run again with `python -m experiments.train --config "
            f"{config_path(run_dir)} resume={run_dir}` (its finished training only tests), or leave the run out")


def read_run(run_dir: Path) -> FinishedRun:
    """The finished run in ``run_dir``, with the config of its newest attempt, checked: a damaged config
    (:func:`_run_config`), metrics.json or nme/test.csv (truncated, say) is a ConfigError naming the file and the
    fix, and so is a per-sample table that is not the test metrics.json reports."""
    missing = {"metrics.json": "it has not finished: rerun its training command to resume it",
               "nme/test.csv": "its test ran without the NME (nme.every_n_epochs=0); train with nme.every_n_epochs "
                               "of 1 or more to compare it here"}
    for name, fix in missing.items():
        if not (run_dir / name).is_file():
            raise ConfigError(f"run {run_dir} has no {name}: {fix}")
    config, test = _run_config(run_dir)
    if test is None:
        raise ConfigError(f"run {run_dir} has no test split (data.test={config.data.test})")
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if not isinstance(metrics, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ConfigError(f"run {run_dir}: metrics.json is damaged ({error}); {_retest_fix(run_dir)}") from None
    if finished_metrics(run_dir) is None:  # its newest attempt was killed: metrics.json is an earlier attempt's
        raise ConfigError(f"run {run_dir}: its last attempt did not finish, so metrics.json holds an earlier "
                          f"attempt's results: rerun its training command to resume it")
    try:
        table = read_per_sample_csv(run_dir / "nme" / "test.csv")
    except ValueError as error:
        raise ConfigError(f"run {run_dir}: nme/test.csv is damaged ({error}); {_retest_fix(run_dir)}") from None
    summary = summarise(table)
    nme, reported = summary["nme_mean"], metrics.get("test/nme")
    if reported is None or nme is None or not np.isclose(nme, reported, rtol=1e-9, atol=0):
        raise ConfigError(f"run {run_dir}: nme/test.csv (mean NME {nme}) is not the test metrics.json reports "
                          f"(test/nme={reported}); {_retest_fix(run_dir)}")
    return FinishedRun(run_dir, config, metrics, table, summary, Path(test).resolve(), metrics.get("test_file_sha256"))


def _run_config(run_dir: Path) -> tuple[DictConfig, str | None]:
    """The config the run's results come from (:func:`experiments.runs.config_path`) and its test file (None: no test split),
    checked: YAML with ``data``, and for a run of one attempt the same bytes as the run's ``config.yaml``, which
    training writes with it (so a truncation that still parses is found)."""
    path, top = config_path(run_dir), run_dir / "config.yaml"
    if path != top and path.parent.name == "001" and top.is_file() and path.read_bytes() != top.read_bytes():
        raise ConfigError(f"run {run_dir}: {top} and {path} differ, though training writes them alike: one is damaged "
                          f"(truncated, say); restore it from the other, or leave the run out")
    try:
        config = OmegaConf.load(path)
        return config, split_path(config.data, "test")
    except (ValueError, yaml.YAMLError) as error:
        why = " ".join(str(error).split())
    except (AttributeError, KeyError, TypeError):
        why = "no data.test or data.dir"
    raise ConfigError(f"run {run_dir}: {path} is damaged ({why}); restore it, or leave the run out")


def compare_runs(paths: list[str | Path], out: Path, group_by: str = "model.name", reference: str | None = None,
                 resamples: int = DEFAULT_RESAMPLES) -> dict:
    """The compare command's table and figures for finished runs, one row per value of ``group_by``;
    returns ``{group: row}`` (each row's ``runs``: its runs' own mean NMEs).

    The runs are :func:`collect_run_dirs` (a run still training is refused) read by :func:`read_run` (a damaged
    file is refused), all tested on the same test file, by content (:func:`common_test_file`: else a ConfigError
    names two runs that differ). The runs of one group are its trainings: each cell is their mean and every
    interval a two-level bootstrap over them and the faces (:func:`~experiments.compare.stats.table_rows`);
    ``reference`` (default the default model, ``vrn``, when present, else the first group) is the row every
    other is paired with. Writes ``table.md`` (titled with the test file's path and SHA-256 prefix), ``table.csv``,
    ``runs.csv`` (one row per run) and the figures into ``out``.
    """
    runs = [read_run(run_dir) for run_dir in collect_run_dirs(paths)]
    digest, file_notes = common_test_file(runs)
    groups = group_runs(runs, group_by)
    reference = reference or (DEFAULT_MODEL if DEFAULT_MODEL in groups else next(iter(groups)))
    if reference not in groups:
        raise ConfigError(f"--reference {reference} is none of the {group_by} values of the runs: {sorted(groups)}")
    tables = {label: [run.table for run in group] for label, group in groups.items()}
    for label, trainings in tables.items():
        if not len(seed_mean_table(trainings)["index"]):
            raise ConfigError(f"the {label} runs share no test face: {', '.join(str(run.dir) for run in groups[label])}")
    rows = table_rows(tables, group_landmarks(groups), reference, resamples)
    for label, group in groups.items():
        rows[label]["runs"] = [run.summary["nme_mean"] for run in group]
    same_by_design = {"seed", "run_dir", "name", "resume", group_by}
    notes = [f"One row per {group_by} ({len(runs)} runs). Where several runs (seeds) share a row, each cell is "
             "their mean (a face that failed in any run counts as failed in the summary columns) and every interval "
             "and difference a two-level bootstrap over the runs and the test faces, so it covers the spread "
             "between trainings too; the runs column gives the number of runs and the range of their own mean NMEs; "
             "the landmark NME is their mean. A row with one run has a faces-only interval."]
    notes += [f"{label} averages runs that also differ in {', '.join(keys)} (separate them with --group-by)."
              for label, group in groups.items()
              if (keys := differing_settings([run.config for run in group], same_by_design))]
    out.mkdir(parents=True, exist_ok=True)
    write_tables(out, rows, reference, f"runs: NME on {runs[0].test_file} (sha256 {digest[:12]})", notes + file_notes)
    write_figures(out, {label: seed_mean_table(trainings) for label, trainings in tables.items()}, list(tables),
                  _expression_names(runs[0].test_file), resamples)
    write_run_list(out / "runs.csv", groups)
    return rows


def group_runs(runs: list[FinishedRun], group_by: str) -> dict[str, list[FinishedRun]]:
    """The runs by the value of config key ``group_by`` (a row of the table each), in the order of their first
    run; a ConfigError names a run whose config lacks the key."""
    groups: dict[str, list[FinishedRun]] = {}
    for run in runs:
        value = OmegaConf.select(run.config, group_by, default=None)
        if value is None:
            raise ConfigError(f"run {run.dir}: its config has no {group_by} to group by (--group-by)")
        groups.setdefault(str(value), []).append(run)
    return groups


def group_landmarks(groups: dict[str, list[FinishedRun]]) -> dict[str, float]:
    """Each group's mean balanced landmark NME over its runs that recorded one (``test/landmark_nme_balanced``),
    as :func:`~experiments.compare.stats.table_rows` takes it; a group without any is left out."""
    landmarks = {}
    for label, group in groups.items():
        scores = [run.metrics["test/landmark_nme_balanced"] for run in group
                  if run.metrics.get("test/landmark_nme_balanced") is not None]
        if scores:
            landmarks[label] = float(np.mean(scores))
    return landmarks


def differing_settings(configs: list[DictConfig], same_by_design: set[str]) -> list[str]:
    """The dotted config keys whose values differ between ``configs``, other than ``same_by_design``."""
    flat = [flat_keys(OmegaConf.to_container(config, resolve=True)) for config in configs]
    keys = sorted(set().union(*flat) - same_by_design)
    return [key for key in keys if len({repr(f.get(key)) for f in flat}) > 1]


def common_test_file(runs: list[FinishedRun]) -> tuple[str, list[str]]:
    """The SHA-256 of the one test file every run was tested on (metrics.json's ``test_file_sha256``), and the
    report's notes about it. A run tested before the digest was recorded is assumed to have been tested on the
    file now at its path, said in a note (on stderr too). A ConfigError names two runs tested on different files,
    or a run without a recorded digest whose file is gone."""
    now: dict[Path, str] = {}  # digests of unrecorded runs' files, each file read once
    unrecorded: dict[Path, list[str]] = {}
    for run in runs:
        if run.test_sha256 is None:
            if not run.test_file.is_file():
                raise ConfigError(f"run {run.dir} did not record which test file it was tested on (test_file_sha256: "
                                  f"it was tested before that was recorded) and {run.test_file} no longer exists: its "
                                  f"faces cannot be matched with other runs'; leave it out")
            if run.test_file not in now:
                now[run.test_file] = file_sha256(run.test_file)
            unrecorded.setdefault(run.test_file, []).append(str(run.dir))
    notes = [f"The test file's identity was not recorded by {', '.join(dirs)} (tested before test_file_sha256 was "
             f"recorded): it is assumed to be the file now at {path} (sha256 {now[path][:12]})."
             for path, dirs in unrecorded.items()]
    for note in notes:
        print(f"[compare] {note}", file=sys.stderr, flush=True)
    digests = [run.test_sha256 or now[run.test_file] for run in runs]
    for run, digest in zip(runs, digests):
        if digest != digests[0]:
            same_path = run.test_file == runs[0].test_file
            changed = " (the file at that path changed between their tests)" if same_path else ""
            raise ConfigError(f"runs {runs[0].dir} and {run.dir} were tested on different files ({runs[0].test_file}, "
                              f"sha256 {digests[0][:12]}, and {run.test_file}, sha256 {digest[:12]}){changed}: their "
                              f"faces cannot be paired; compare them in separate --runs calls")
    paths = sorted({str(run.test_file) for run in runs})
    if len(paths) > 1:
        notes.append(f"The runs' test files at {', '.join(paths)} are the same file (sha256 {digests[0][:12]}).")
    return digests[0], notes


def _expression_names(test_file: Path):
    """The test file's expression names (label id -> name), None when the file is gone or has none."""
    if not test_file.is_file():
        return None
    return open_dataset(test_file).expression_names or None
