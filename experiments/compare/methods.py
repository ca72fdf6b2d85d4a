"""The rows of a comparison (``--config``) as values: :class:`Method`, and :func:`compared_methods`, every
method of a :class:`~experiments.compare.settings.CompareSettings` in the table's order."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.compare.settings import CompareSettings

GROUND_TRUTH = "ground-truth"
""":attr:`Method.landmarks` of a guided method given each test face's ground-truth landmarks."""
DETECTED = "detected"
""":attr:`Method.landmarks` of a guided method given its detector's landmarks (``CompareSettings.guidance``)."""


@dataclass(frozen=True)
class Method:
    """A row of the comparison: ``name``, a method of the settings (a trained variant, the name its run
    directory ``runs/NAME`` has) or a baseline, and for a guided method ``landmarks``, where the landmarks
    guiding it come from (:data:`GROUND_TRUTH` or :data:`DETECTED`; None for every other method)."""

    name: str
    landmarks: str | None = None

    @property
    def label(self) -> str:
        """The row's text in the table, the figures and W&B (its folder is ``slug(label)``):
        ``"VRN-Guided (detected landmarks)"``, or the name alone for an unguided method."""
        return self.name if self.landmarks is None else f"{self.name} ({self.landmarks} landmarks)"


FIT = Method("3DMM fit to detected landmarks")
MEAN_VOLUME = Method("mean training volume")
ORACLE = Method("mean shape at GT pose (oracle)")
BASELINES = (FIT, MEAN_VOLUME, ORACLE)
"""The baselines every comparison scores, in the table's order."""


def trained_methods(settings: CompareSettings) -> list[Method]:
    """Each trained method once: with ground-truth landmarks when it is guided, else plain."""
    return [Method(name, GROUND_TRUTH if name in settings.guidance else None) for name in settings.methods]


def detected_methods(settings: CompareSettings) -> list[Method]:
    """Each guided method with its detector's landmarks."""
    return [Method(name, DETECTED) for name in settings.guidance]


def compared_methods(settings: CompareSettings) -> list[Method]:
    """Every row of the table, in its order: the trained methods, the guided ones with detected landmarks, the
    baselines."""
    return [*trained_methods(settings), *detected_methods(settings), *BASELINES]
