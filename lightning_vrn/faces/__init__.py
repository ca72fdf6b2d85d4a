"""Faces in photographs: boxes and five points (:mod:`~lightning_vrn.faces.detector`)."""

from lightning_vrn.faces.detector import FaceBox, FaceDetector

__all__ = ["FaceBox", "FaceDetector"]
