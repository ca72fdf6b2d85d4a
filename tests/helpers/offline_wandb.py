"""Reading offline W&B runs (``wandb/offline-run-*``) without a network: their run log records, and a stand-in
for ``wandb.Api`` that answers with what a W&B server would hold after ``wandb sync`` uploaded them."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
import time
from pathlib import Path

BLOCK = 32768  # a W&B run log (.wandb) is a LevelDB log: 32 KiB blocks of records with 7-byte headers


def _records(data: bytes):
    """The protobuf records of a .wandb file's bytes (a record still being written is left out)."""
    from wandb.proto import wandb_internal_pb2

    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""  # after the file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run_folder(folder: Path) -> dict:
    """The offline run in ``folder`` (``.../wandb/offline-run-*``) once W&B's service has written its exit (it
    writes after the run is closed; waits up to 60 s): ``run`` (the run record), ``config``, ``summary``,
    ``files`` (the names of the files it saved, which ``wandb sync`` uploads) and ``exit_code`` (None when the
    run has not ended)."""
    (log,) = folder.glob("run-*.wandb")
    deadline = time.time() + 60
    while True:
        records = list(_records(log.read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.5)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    summary, files, exit_code = {}, [], None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind == "files":
            files += [item.path for item in record.files.files]
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run, "config": config, "summary": summary, "files": files, "exit_code": exit_code}


def offline_run(parent: Path) -> tuple[Path, dict]:
    """The one offline W&B run under ``parent/wandb``: its folder, and :func:`read_run_folder` of it."""
    (folder,) = (parent / "wandb").glob("offline-run-*")
    return folder, read_run_folder(folder)


class OfflineFile:
    """A saved file of an offline run, as ``wandb.apis.public.File``: ``name``, ``md5`` (base64, as W&B gives it;
    ``"0"`` for the placeholder W&B returns for a requested name the run does not have), ``download``."""

    def __init__(self, name: str, path: Path | None):
        self.name, self._path = name, path
        self.md5 = "0" if path is None else base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()

    def download(self, root: str = ".", replace: bool = False, exist_ok: bool = False, api=None):
        if self._path is None:
            raise ValueError(f"{self.name} is a placeholder (md5 0): the run has no such file")
        target = Path(root) / self.name
        if target.exists() and not replace:
            raise ValueError(f"{target} exists (W&B's File.download refuses it without replace=True)")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path, target)
        return open(target)


class OfflineRun:
    """An offline run as ``wandb.apis.public.Run``: id, name, group, job_type, tags, state, config, files."""

    def __init__(self, folder: Path):
        logged = read_run_folder(folder)
        run = logged["run"]
        self.id, self.name, self.group, self.job_type = run.run_id, run.display_name, run.run_group, run.job_type
        self.tags, self.config, self.summary = list(run.tags), logged["config"], logged["summary"]
        self.state = {None: "running", 0: "finished"}.get(logged["exit_code"], "failed")
        self._folder, self._saved = folder, logged["files"]

    def files(self, names: list[str] | None = None, pattern: str | None = None, per_page: int = 50):
        """The files the run saved (those ``wandb sync`` uploads); with ``names``, one file per name, a placeholder
        (md5 ``"0"``) for a name the run did not save, as W&B's server answers."""
        saved = dict.fromkeys(self._saved)
        if names is None:
            return [OfflineFile(name, self._folder / "files" / name) for name in saved]
        return [OfflineFile(name, self._folder / "files" / name if name in saved else None) for name in names]


class OfflineApi:
    """``wandb.Api`` over offline runs: ``runs("ENTITY/PROJECT")`` gives the runs under ``projects[project]``
    (directories whose ``wandb`` folder holds offline runs); an unknown project raises as W&B does."""

    def __init__(self, projects: dict[str, list[Path]]):
        self.projects = projects

    def runs(self, path: str, filters=None, order: str = "+created_at", per_page: int = 50, **kwargs):
        if path not in self.projects:
            raise ValueError(f"Could not find project {path}")
        return [OfflineRun(folder) for parent in self.projects[path]
                for folder in sorted((Path(parent) / "wandb").glob("offline-run-*"))]
