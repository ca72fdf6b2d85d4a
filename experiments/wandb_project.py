"""The suite's W&B runs: their ids and mode (:func:`wandb_run_id`, :func:`wandb_offline`), and a W&B project's
finished trainings as local run directories, for ``experiments.compare --wandb ENTITY/PROJECT``.

At its end a training that logs to W&B saves :data:`RUN_FILES` (its resolved config, its final metrics and
the test's per-face NME table) into its W&B run, under :data:`FOLDER` (W&B keeps its own ``config.yaml``
at the top). :func:`fetch_runs` downloads them again, one folder per finished training run, laid out as a
run directory, so the compare command pairs and bootstraps W&B runs face by face exactly as it does local
runs (the W&B summaries alone hold no per-face values, so they could not give the same intervals).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlsplit

from tqdm import tqdm

from experiments.config import ConfigError, ExperimentSettings

FOLDER = "lightning_vrn"
"""The folder of a W&B run's files that holds :data:`RUN_FILES`."""

RUN_FILES = ("config.yaml", "metrics.json", "nme/test.csv")
"""A run directory's files that the compare command reads (paths relative to the run directory)."""


def wandb_run_id(cfg: ExperimentSettings, run_dir: Path) -> str:
    """The W&B run id of the training in ``run_dir``: the id of the newest run W&B has written into
    ``run_dir/wandb`` (so a moved run directory resumes its W&B run and evaluations link to it), else, for a
    run that has not logged to W&B yet, ``{name}-{8 hex digits of the run directory's path}``."""
    # W&B's folder of a run is [offline-]run-YYYYMMDD_HHMMSS-{id}[-N] and holds run-{id}.wandb, its log
    logs = sorted((run_dir / "wandb").glob("*run-*/run-*.wandb"), key=lambda log: log.parent.name.removeprefix("offline-"))
    if logs:
        return logs[-1].stem.removeprefix("run-")
    return f"{cfg.name}-{hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:8]}"


def wandb_offline() -> bool:
    """Whether W&B runs offline: ``WANDB_MODE=offline``, no ``WANDB_MODE`` and no ``WANDB_API_KEY``, or (no
    ``WANDB_MODE``, no proxy, whose reach cannot be told from here) a W&B server (``WANDB_BASE_URL``, default
    W&B's) that does not answer within :data:`SERVER_TIMEOUT_S`: then a warning says so and the run logs
    offline, instead of W&B failing minutes later."""
    mode = os.environ.get("WANDB_MODE")
    if mode == "offline" or (mode is None and not os.environ.get("WANDB_API_KEY")):
        return True
    if mode is not None or any(os.environ.get(name) for name in PROXY_VARIABLES):
        return False
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    problem = server_unreachable(url)
    if problem:
        warnings.warn(f"the W&B server {url} cannot be reached ({problem}): logging offline into the run's wandb/ "
                      f"folder; upload it later with `wandb sync`, and set WANDB_MODE=offline to skip this check",
                      stacklevel=2)
    return problem is not None


SERVER_TIMEOUT_S = 5.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def server_unreachable(url: str, timeout: float = SERVER_TIMEOUT_S) -> str | None:
    """Why a TCP connection to ``url``'s host and port fails within ``timeout`` seconds, None when it opens."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__
    return None


def upload_run_files(experiment: Any, run_dir: Path) -> None:
    """Copy the :data:`RUN_FILES` that ``run_dir`` holds into the W&B run ``experiment`` (a ``wandb`` Run),
    under :data:`FOLDER`, and save them: uploaded now when online, by ``wandb sync`` when offline."""
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            copy = Path(experiment.dir) / FOLDER / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / name, copy)
            experiment.save(str(copy), base_path=experiment.dir, policy="now", glob=False)  # a path, not a pattern


def parse_project(project: str) -> str:
    """``ENTITY/PROJECT``, checked for its form (a ConfigError names the fix otherwise)."""
    parts = project.split("/")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--wandb takes ENTITY/PROJECT (e.g. my-team/lightning-vrn), got {project!r}")
    return project


def select_runs(runs: Iterable[Any], tags: Sequence[str] = ()) -> tuple[list[Any], list[str]]:
    """The finished training runs among ``runs`` (W&B public-API runs) that carry every tag in ``tags``, and a
    note for each one left out because it has not finished (its state is not ``finished``). Evaluation runs
    (``job_type`` eval) and runs without every tag are left out silently."""
    wanted, chosen, notes = set(tags), [], []
    for run in runs:
        if run.job_type == "eval" or not wanted <= set(run.tags or ()):
            continue
        if run.state != "finished":
            notes.append(f"{run.id} ({run.name}): {run.state}, not finished, left out")
            continue
        chosen.append(run)
    return chosen, notes


def fetch_runs(project: str, dest: Path, tags: Sequence[str] = (), api: Any = None) -> list[Path]:
    """Download the :data:`RUN_FILES` of every finished training run of the W&B ``project`` (``ENTITY/PROJECT``)
    with all of ``tags`` into ``dest/{run id}`` (each laid out as a run directory; a run fetched before is
    replaced, so a rerun picks up resumed runs); returns those folders.

    ``api``: a ``wandb.Api`` (default: a new one, which needs ``WANDB_API_KEY`` or ``wandb login`` and the
    network). A run without the files (trained before they were uploaded, or with ``nme.every_n_epochs=0``)
    is left out with a note on stderr; a ConfigError when the project cannot be read or has no such run.
    """
    parse_project(project)
    try:
        if api is None:
            import wandb

            api = wandb.Api()
        runs, notes = select_runs(api.runs(project), tags)
    except ConfigError:
        raise
    except Exception as error:  # no API key, no network, no such project: W&B raises several kinds
        raise ConfigError(f"cannot list the runs of W&B project {project}: {error}. Check the name "
                          f"(ENTITY/PROJECT), the API key (WANDB_API_KEY or `wandb login`) and the network") from None
    fetched = []
    for run in tqdm(runs, desc=f"fetching {project}", unit="run", file=sys.stderr, disable=not runs):
        names = [f"{FOLDER}/{name}" for name in RUN_FILES]
        try:
            # W&B answers a name the run lacks with a placeholder whose md5 is "0" (as wandb.restore checks)
            files = {file.name: file for file in run.files(names=names) if file.md5 != "0"}
            missing = [name for name in names if name not in files]
            if missing:
                notes.append(f"{run.id} ({run.name}): has no {', '.join(missing)} (trained before runs uploaded "
                             f"them, or without the test NME), left out")
                continue
            fetched.append(_download(run.id, files, dest))
        except Exception as error:  # the network, the server or the disk
            raise ConfigError(f"cannot download the files of W&B run {project}/{run.id} into {dest}: {error}. "
                              f"Check the network and the disk, then rerun (finished downloads are redone)") from None
    for note in notes:
        print(f"[compare] W&B run {note}", file=sys.stderr, flush=True)
    if not fetched:
        with_tags = f" with tags {sorted(tags)}" if tags else ""
        raise ConfigError(f"W&B project {project} has no finished training run{with_tags} that holds "
                          f"{', '.join(f'{FOLDER}/{name}' for name in RUN_FILES)}")
    return fetched


def _download(run_id: str, files: dict[str, Any], dest: Path) -> Path:
    """``files`` (W&B name -> public-API File) of run ``run_id`` into ``dest/run_id``, replacing it only once
    every file has arrived."""
    partial, final = dest / f".{run_id}.partial", dest / run_id
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for file in files.values():
        file.download(root=str(partial), replace=True).close()  # download returns the file, opened
    shutil.rmtree(final, ignore_errors=True)
    (partial / FOLDER).rename(final)
    shutil.rmtree(partial)
    return final
