"""The settings of a comparison (``--config``): :class:`CompareSettings`, read by :func:`load_compare_settings`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from experiments.baselines import DEFAULT_REGULARISATION
from experiments.config import CONFIG_DIR, ConfigError, load_config, load_settings
from experiments.evaluation import EVAL_BATCH_SIZE
from lightning_vrn.models import MODELS, LandmarkHourglass
from lightning_vrn.models.guided import VRNGuided


@dataclass
class DataSplits:
    """The synthetic data of the comparison (made with ``--frontal``), in ``dir``."""

    dir: str = "data/compare"
    grid: str = "100,96,96"
    train: int = 800
    val: int = 32
    test: int = 100
    seed: int = 0
    workers: int = 2


@dataclass
class RealPhotos:
    """Real photos scored beside the synthetic test split: ``root``, a folder of AFLW2000-3D photos and ``.mat``
    files (None: none; a folder that does not exist is skipped with a note), converted by data_prep.aflw2000 with
    the Basel Face Model at ``bfm`` (the mean face at the fitted pose when it has no bases) onto the data's grid.
    Paths are relative to the working directory."""

    root: Optional[str] = None
    bfm: str = "../shared/data/bfm_meta"


@dataclass
class CompareSettings:
    """A comparison. ``train_config``: the experiment config every training extends (in
    experiments/configs); ``overrides``: ``key=value`` for every training; ``detectors`` and
    ``methods``: name -> ``"variant [key=value ...]"``, a registered variant (trained as its preset says,
    docs/variants.md) and its own overrides, if any; ``guidance``: guided method -> the detector that
    guides it at evaluation; ``fit_detector``: the detector whose landmarks the 3DMM fit uses;
    ``fit_regularisation``: the fit's Tikhonov lambda; ``reference``: the method every other is
    compared with; ``real_photos``: real photos every method is scored on too (:class:`RealPhotos`); ``seeds``: how
    many times every detector and method is trained (seeds ``seed``, ``seed + 1``, ...; the table's intervals then
    cover the spread between trainings as well as between faces); ``contrasts``: name -> ``[first, second]``, two
    rows of the table (labels such as ``"VRN-Guided (detected landmarks)"``) whose paired difference, first minus
    second, is reported with its verdict beside the differences from ``reference``. A compare config may extend another
    (``extends: compare_quickstart.yaml``)."""

    name: str = "compare"
    out: str = "runs/compare"
    data: DataSplits = field(default_factory=DataSplits)
    train_config: str = "quickstart.yaml"
    overrides: list = field(default_factory=list)
    detectors: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)
    guidance: dict = field(default_factory=dict)
    fit_detector: str = "detector"
    fit_regularisation: float = DEFAULT_REGULARISATION
    reference: str = "VRN"
    batch_size: int = EVAL_BATCH_SIZE
    bootstrap_resamples: int = 2000
    real_photos: RealPhotos = field(default_factory=RealPhotos)
    seeds: int = 3
    contrasts: dict = field(default_factory=dict)

    def training_overrides(self, name: str) -> list[str]:
        """The ``key=value`` overrides that train the detector or method ``name``: its variant, then its own."""
        variant, *own = shlex.split((self.detectors | self.methods)[name])
        return [f"model.name={variant}", *own]


def load_compare_settings(path: str | Path, overrides: list[str] = ()) -> CompareSettings:
    """The comparison settings at ``path`` (with its ``extends`` chain) and ``a.b=c`` overrides, checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"compare config {path} does not exist; shipped: "
                          f"{', '.join(p.name for p in sorted(CONFIG_DIR.glob('compare_*.yaml')))}")
    settings = load_settings(CompareSettings, path, overrides)
    if not isinstance(settings.seeds, int) or settings.seeds < 1:
        raise ConfigError(f"{path}: seeds is {settings.seeds!r}; give how many times to train each method, 1 or more "
                          f"(3 lets the intervals cover the spread between trainings)")
    _check_trainings(settings, path)
    unknown = sorted((set(settings.guidance.values()) | {settings.fit_detector}) - set(settings.detectors))
    if unknown:
        raise ConfigError(f"{path}: guidance or fit_detector name detectors {unknown} that 'detectors' does not "
                          f"define ({sorted(settings.detectors)})")
    if not set(settings.guidance) <= set(settings.methods):
        raise ConfigError(f"{path}: guidance names methods {sorted(set(settings.guidance) - set(settings.methods))} "
                          f"that 'methods' does not define ({sorted(settings.methods)})")
    if settings.reference not in settings.methods:
        raise ConfigError(f"{path}: reference {settings.reference!r} is not one of the methods {sorted(settings.methods)}")
    _check_contrasts(settings, path)
    real = settings.real_photos
    if real.root is not None and Path(real.root).is_dir() and not Path(real.bfm).exists():
        raise ConfigError(f"{path}: real_photos.bfm {real.bfm} does not exist (relative to {Path.cwd()}); the photos "
                          f"of real_photos.root {real.root} need a Basel Face Model folder, e.g. "
                          f"../shared/data/bfm_meta, or set real_photos.root=null to leave them out")
    return settings


def _check_trainings(settings: CompareSettings, path: Path) -> None:
    """Refuse, before any data or training, a detector or method entry that names no variant, does not compose
    into a training config, or is the wrong kind (a detector must predict landmarks, guidance needs a guided
    variant), and a name used for both a detector and a method."""
    for section in ("detectors", "methods"):
        for name, entry in getattr(settings, section).items():
            words = shlex.split(entry) if isinstance(entry, str) else []
            if not words or words[0] not in MODELS or any("=" not in word for word in words[1:]):
                raise ConfigError(f"{path}: {section}.{name} is {entry!r}; write a registered variant "
                                  f"({', '.join(sorted(MODELS))}) and any key=value overrides, e.g. "
                                  f"'vrn_guided model.net.stacks=1'")
    both = sorted(set(settings.detectors) & set(settings.methods))
    if both:
        raise ConfigError(f"{path}: {both} named both a detector and a method; give each its own name")
    for name in [*settings.detectors, *settings.methods]:  # every training composes: a bad key fails now
        try:
            load_config(CONFIG_DIR / settings.train_config, settings.training_overrides(name) + settings.overrides)
        except ConfigError as error:
            raise ConfigError(f"{path}: the training of {name!r} would fail: {error}") from None
    for name, entry in settings.detectors.items():
        if not issubclass(MODELS[shlex.split(entry)[0]], LandmarkHourglass):
            raise ConfigError(f"{path}: detectors.{name} is {entry!r}, which predicts no landmarks: a detector is a "
                              f"landmark_hourglass")
    for name in settings.guidance:
        if name in settings.methods and not issubclass(MODELS[shlex.split(settings.methods[name])[0]], VRNGuided):
            raise ConfigError(f"{path}: guidance names {name!r} ({settings.methods[name]!r}), which takes no landmark "
                              f"maps: guide only a vrn_guided variant")


def _check_contrasts(settings: CompareSettings, path: Path) -> None:
    """Refuse a contrast that is not two different rows of the table."""
    from experiments.compare.methods import compared_methods  # it imports this module

    labels = [method.label for method in compared_methods(settings)]
    for name, pair in settings.contrasts.items():
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or pair[0] == pair[1]
                or any(label not in labels for label in pair)):
            raise ConfigError(f"{path}: contrasts.{name} is {pair!r}; give two different rows of the table, "
                              f"[first, second] (reported: first minus second), from {labels}")
