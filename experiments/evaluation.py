"""The evaluation pipeline ``experiments.evaluate`` and ``experiments.compare`` share: a test DataModule for a
model, one ``Trainer.test`` pass scored by the :class:`~lightning_vrn.callbacks.NMECallback` (the test path
training's test stage takes) and its landmark NMEs (an :class:`Evaluation`), what a test file's ground truth is,
the landmark detector of ``--landmarks-model``, the median-error reconstruction, and the W&B eval run linked to
the training run.

It lives in ``experiments`` (not ``lightning_vrn``) because the W&B eval run reads training configs
(:mod:`experiments.config`) and run identities (:mod:`experiments.wandb_project`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from datamodules import FaceVolumeDataModule
from experiments.config import LoggerSettings, load_config
from lightning_vrn.callbacks import NMECallback, NMESettings
from lightning_vrn.dataset_file import open_dataset
from lightning_vrn.geometry import VoxelGrid
from lightning_vrn.geometry.isosurface import volume_to_mesh
from lightning_vrn.geometry.mesh_io import write_obj
from lightning_vrn.heatmaps import gaussian_heatmaps
from lightning_vrn.metrics.pool import NMEPool
from lightning_vrn.models import LandmarkHourglass, VRNGuided, VRNModule, load_model
from lightning_vrn.models.guided import DetectedGuidance
from lightning_vrn.models.landmark_hourglass import LandmarkScoring
from lightning_vrn.visualise import save_comparison, shade_mesh, vertex_colours_from_image

MODEL = "model"
DETECTOR = "landmark detector"


def slug(method: str) -> str:
    """Folder name of a method's report: ``"mean shape at GT pose"`` -> ``"mean_shape_at_GT_pose"``."""
    return "_".join(method.split())


EVAL_BATCH_SIZE = 8
"""Test batch size of ``evaluate`` and ``compare`` (scores do not depend on it beyond float rounding)."""


def evaluation_data(test_path: str | Path, grid: VoxelGrid, batch_size: int, heatmap_sigma: float | None = None,
                    target_frame: str | None = None, num_workers: int = 0,
                    grid_source: str = "the config") -> FaceVolumeDataModule:
    """The test split at ``test_path`` as a model needs it, opened and checked: landmark heatmaps at
    ``heatmap_sigma`` (None: none) and target volumes in ``target_frame`` (None: ``aligned``). ``grid_source``
    names where ``grid`` came from, for the error when the file has another grid."""
    datamodule = FaceVolumeDataModule(test_path=test_path, grid=grid, batch_size=batch_size, num_workers=num_workers,
                                      heatmap_sigma=heatmap_sigma, target_volume=target_frame or "aligned",
                                      persistent_workers=False, grid_source=grid_source)
    datamodule.check_files("test")
    return datamodule


@dataclass(frozen=True)
class Evaluation:
    """One method's test pass on one file: the NME ``summary`` and per-sample ``table`` (None for a method without
    volumes), its ``landmarks`` NMEs (:func:`landmark_scores`; empty for a method without landmarks) and their
    per-sample ``landmark_table`` (``index``, ``yaw_deg``, ``landmark_nme`` (N,); None without landmarks)."""

    summary: dict | None
    table: dict | None
    landmarks: dict[str, float | None]
    landmark_table: dict[str, np.ndarray] | None


def evaluation_report(module: pl.LightningModule, datamodule: FaceVolumeDataModule, out_dir: Path | None,
                      max_samples: int | None = None, nme: NMESettings | None = None,
                      pool: NMEPool | None = None) -> Evaluation:
    """Run ``module`` through ``Trainer.test``: its :class:`Evaluation`.

    With ``out_dir`` the NME callback scores the test steps' volumes (``nme``: its settings, None for the
    defaults; ``pool``: the worker pool it scores in, None for its own) and writes ``out_dir/test.csv``
    and ``out_dir/test_summary.json``; without it (a landmark detector, which predicts no volume)
    only the module's own landmark NMEs come back, and the summary and table are None.
    """
    callbacks = [] if out_dir is None else [NMECallback(nme, out_dir=out_dir, max_test_samples=max_samples,
                                                        pool=pool)]
    limit = 1.0 if max_samples is None else math.ceil(max_samples / datamodule.hparams.batch_size)
    trainer = pl.Trainer(accelerator="auto", devices=1, logger=False, callbacks=callbacks, enable_checkpointing=False,
                         enable_model_summary=False, limit_test_batches=limit)
    logged = (trainer.test(module, datamodule=datamodule, verbose=False) or [{}])[0]
    summary, table = (None, None) if out_dir is None else (callbacks[0].summaries["test"], callbacks[0].tables["test"])
    landmark_table = module.test_landmark_table if isinstance(module, LandmarkScoring) else None
    return Evaluation(summary, table, landmark_scores(logged), landmark_table)


def landmark_scores(logged: dict) -> dict[str, float | None]:
    """The landmark NMEs among a test's logged metrics, without the stage: ``{"landmark_nme": ..., ...}``
    (None for an empty |yaw| bucket, as in the NME summaries)."""
    return {key.split("/", 1)[1]: None if math.isnan(float(value)) else float(value)
            for key, value in logged.items() if "landmark_nme" in key}


def ground_truth(path: str | Path) -> str:
    """What the ground truth of test file ``path`` is: its ``ground_truth`` attribute (a converted AFLW2000-3D or
    300W-LP file: the BFM's mean face at the fitted pose, or its bases' fit), else the file's own meshes."""
    attrs = open_dataset(path).attrs
    return str(attrs.get("ground_truth") or f"the {attrs.get('source', 'unnamed')} file's own meshes "
                                            f"(face model {attrs.get('face_model', 'not recorded')})")


def landmark_detector(path: Path, grid, trust: bool = False) -> LandmarkHourglass:
    """The trained ``landmark_hourglass`` of checkpoint ``path`` (``--landmarks-model``), on the model's ``grid``."""
    detector = load_model(path, trust=trust)
    if not isinstance(detector, LandmarkHourglass):
        raise ValueError(f"--landmarks-model {path} holds a {detector.variant!r} checkpoint, not a landmark detector: "
                         f"give a trained landmark_hourglass "
                         f"(python -m experiments.train model.name=landmark_hourglass)")
    if detector.grid != grid:
        raise ValueError(f"--landmarks-model {path} was trained on grid {detector.grid.describe()}, the model on "
                         f"{grid.describe()}: the detector must see the model's crop; train it on that grid")
    return detector


def landmark_sources(methods: dict[str, pl.LightningModule], detector_path: Path | None) -> dict[str, str | None]:
    """Where each method's 68 landmarks come from: ``"model"`` (its own heatmap heads: VRN-Multitask, the
    detector), ``"detector PATH"`` for the checkpoint's volume-only model when ``--landmarks-model`` is given
    (its 2D landmarks are the detector's, lifted onto the predicted surface for 3D: its 2D landmark NME is
    the detector's), else None (the baselines; a volume-only model without a detector)."""
    def source(name: str, module: pl.LightningModule) -> str | None:
        if isinstance(module, LandmarkScoring):
            return "model"
        return f"detector {detector_path}" if name == MODEL and detector_path is not None else None

    return {name: source(name, module) for name, module in methods.items()}


def write_reconstruction(out: Path, model: VRNModule | DetectedGuidance, data: Path, table: dict) -> None:
    """The median-error sample: coloured .obj of the prediction and a side-by-side PNG (a guided model without a
    detector is guided by the sample's ground-truth landmarks)."""
    grid = model.grid
    ok = np.flatnonzero(~table["failed"])
    row = int(ok[np.argsort(table["nme"][ok])[len(ok) // 2]]) if len(ok) else 0
    index, nme = int(table["index"][row]), float(table["nme"][row])
    test_file = open_dataset(data, grid, grid_source="the checkpoint")
    scan = test_file.per_sample_topology  # scans: each sample has its own triangles
    sample = test_file.read(index, ["images", "vertices", "landmarks_2d"] + (["triangles"] if scan else []))
    image = sample["images"]
    batch = {"image": torch.from_numpy(image[None]).permute(0, 3, 1, 2).float().div(255.0)}
    if isinstance(model, VRNGuided):
        batch["heatmaps"] = gaussian_heatmaps(torch.from_numpy(sample["landmarks_2d"][None]), grid.height, grid.width,
                                              model.heatmap_sigma)
    with torch.no_grad():
        volume = model.predict_step(batch)[0].numpy()
    vertices, triangles = volume_to_mesh(volume, grid)
    write_obj(out / "reconstruction.obj", vertices, triangles, vertex_colours_from_image(vertices, image))
    panels = {
        "prediction": shade_mesh(vertices, triangles, grid.crop_size),
        "ground truth": shade_mesh(sample["vertices"], sample["triangles"] if scan else test_file.triangles,
                                   grid.crop_size),
    }
    save_comparison(out / "reconstruction.png", image, panels, title=f"sample {index}: NME {nme:.4f}")


def wandb_wanted(flag: bool | None, run_dir: Path | None) -> bool:
    """``--log-wandb`` / ``--no-log-wandb`` when given, else whether the training config of ``run_dir`` had logger.wandb."""
    if flag is not None:
        return flag
    return run_dir is not None and bool(load_config(run_dir / "config.yaml").logger.wandb)


def log_eval_run(out: Path, run_dir: Path | None, results: dict[str, Evaluation], config: dict,
                 group: str, name: str | None = None) -> str:
    """Log an evaluation into a new W&B run with ``job_type=eval`` in ``out/wandb``; returns its id.

    The run is linked to the training of ``run_dir``: the same project, entity, group and tags, and the
    config field ``training_run_id`` naming its W&B run (None when it logged none, or without a run
    directory: then the default project and ``group``). ``results``: key prefix (``eval``,
    ``eval/{method}``) -> :class:`Evaluation` (its NME summary and table None for a method without volumes, the
    landmark detector); logged as summary values ``{prefix}/{key}`` (NME mean,
    median, per yaw bucket, landmark NMEs, ...; the same numbers as ``metrics.json``), ``{prefix}/per_sample``
    (a ``wandb.Table``) and one cumulative error plot ``ced`` of every prefix with a table.
    Offline like training (no ``WANDB_API_KEY``, or ``WANDB_MODE=offline``); the run id is derived from
    ``out``, so evaluating into the same folder again resumes that run.
    """
    import wandb

    from experiments.wandb_project import wandb_offline, wandb_run_id
    from lightning_vrn.wandb_media import ced_plot, per_sample_table

    training = load_config(run_dir / "config.yaml") if run_dir is not None else None
    logger = training.logger if training is not None else LoggerSettings()
    training_run_id = wandb_run_id(training, run_dir) if training is not None and training.logger.wandb else None
    run_id = f"eval-{hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=logger.project, entity=logger.entity, id=run_id, resume="allow", dir=str(out),
                     name=name or f"{training.name if training is not None else group}-eval", job_type="eval",
                     group=(logger.group or training.model.name) if training is not None else group,
                     tags=list(logger.tags), mode="offline" if wandb_offline() else None,
                     config={**config, "training_run_id": training_run_id,
                             "training_run_dir": None if run_dir is None else str(run_dir)})
    with run:
        for prefix, evaluation in results.items():
            run.summary.update({f"{prefix}/{key}": value
                                for key, value in {**(evaluation.summary or {}), **evaluation.landmarks}.items()})
            if evaluation.table is not None:
                run.log({f"{prefix}/per_sample": per_sample_table(evaluation.table)})
        run.log({"ced": ced_plot({prefix: e.table for prefix, e in results.items() if e.table is not None},
                                 "NME cumulative error curve")})
    return run_id
