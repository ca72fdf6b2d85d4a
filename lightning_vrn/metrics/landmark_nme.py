"""68-point 2D landmark NME, the AFLW2000-3D protocol of 3DDFA's ``benchmark_aflw2000.py``.

Per image: the mean 2D distance over the 68 points divided by ``sqrt(w * h)`` of the ground-truth
landmarks' bounding box. Over a set: the mean, the mean per |yaw| bucket (0-30, 30-60, 60-90
degrees; :data:`lightning_vrn.metrics.report.YAW_BUCKETS_DEG`) and the balanced NME, the mean of
the bucket means (3DDFA's headline). 3DDFA's buckets are ``|yaw| <= 30``, ``30 < |yaw| <= 60`` and
``|yaw| > 60``: a yaw of exactly 30 or 60 degrees falls in the upper bucket here, the lower one there.

AFLW2000-3D has two ground truths: the original ``pt3d_68`` (``landmarks_2d``) and 3DDFA's
re-annotation (``landmarks_2d_reannotated``); a :class:`LandmarkNME` scores one, named by its ``prefix``.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_vrn.metrics.report import YAW_BUCKETS_DEG, balanced_mean, yaw_bucket_means


def landmark_nme(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``(B,)`` NME of ``(B, 68, 2)`` predicted against ground-truth landmarks (crop pixels), in their dtype.

    A ground-truth box without area (all points on a line) has no normaliser: its NME is inf or NaN.
    """
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"pred and gt must both be (B, L, 2) landmarks, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    box_size = (gt.amax(dim=1) - gt.amin(dim=1)).prod(dim=-1).sqrt()  # (B,) sqrt(w * h)
    return torch.linalg.vector_norm(pred - gt, dim=-1).mean(dim=-1) / box_size


class LandmarkNME(Metric):
    """Landmark NME over samples, exact under DDP: per-sample states, each dataset index counted once.

    ``compute()`` gives float64 scalars: ``{prefix}`` (the mean over samples), ``{prefix}_yaw_{lo}_{hi}``
    per |yaw| bucket (NaN when empty) and ``{prefix}_balanced`` (the mean of the non-empty bucket means;
    NaN when none). ``prefix``: ``landmark_nme`` (against the original landmarks) or
    ``landmark_nme_reannotated`` (against AFLW2000-3D's re-annotated ones).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    PER_SAMPLE = ("sample_index", "sample_yaw", "sample_nme")

    def __init__(self, prefix: str = "landmark_nme", **kwargs):
        super().__init__(**kwargs)
        self.prefix = prefix
        # float64 per-sample values; set_dtype so an empty state of a process that saw nothing has it too.
        for name in self.PER_SAMPLE:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.set_dtype(torch.float64)

    def update(self, pred: torch.Tensor, gt: torch.Tensor, yaw_rad: torch.Tensor, index: torch.Tensor) -> None:
        """Add a batch: ``pred``, ``gt`` (B, 68, 2) crop pixels; ``yaw_rad`` (B,) ground-truth yaw; ``index`` (B,)."""
        nme = landmark_nme(pred.detach().to(self.device, torch.float64), gt.detach().to(self.device, torch.float64))
        yaw_deg = torch.rad2deg(yaw_rad.detach().to(self.device, torch.float64).reshape(-1))
        index = index.detach().to(self.device, torch.float64).reshape(-1)
        if not len(nme) == len(yaw_deg) == len(index):
            raise ValueError(f"LandmarkNME.update needs one entry per sample: got {len(nme)} landmark sets, "
                             f"{len(yaw_deg)} yaws, {len(index)} indices")
        for name, values in zip(self.PER_SAMPLE, (index, yaw_deg, nme)):
            getattr(self, name).append(values)

    def per_sample(self) -> dict[str, np.ndarray]:
        """The samples added so far, each dataset index once, by index: ``index`` (N,) int64, ``yaw_deg`` and
        ``landmark_nme`` (N,) float64 (this process's samples; inside ``sync_context()`` every process's)."""
        states = [getattr(self, name) for name in self.PER_SAMPLE]  # lists, or tensors once synchronised
        columns = [dim_zero_cat(state).cpu().numpy() if len(state) else np.zeros(0) for state in states]
        index, first = np.unique(columns[0].astype(np.int64), return_index=True)
        return {"index": index, "yaw_deg": columns[1][first], "landmark_nme": columns[2][first]}

    def compute(self) -> dict[str, torch.Tensor]:
        """The mean, the per-|yaw|-bucket means and the balanced mean (see the class)."""
        samples = self.per_sample()
        nme = samples["landmark_nme"]
        bucket_means = yaw_bucket_means(nme, samples["yaw_deg"])
        values = {self.prefix: nme.mean() if len(nme) else np.nan,
                  **{f"{self.prefix}_yaw_{lo}_{hi}": mean for (lo, hi), mean in zip(YAW_BUCKETS_DEG, bucket_means)},
                  f"{self.prefix}_balanced": balanced_mean(bucket_means)}
        return {name: torch.tensor(value, dtype=torch.float64) for name, value in values.items()}
