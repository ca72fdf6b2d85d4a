"""Evaluation metrics: ``nme`` (the paper's NME; needs Open3D), ``iou`` (voxel IoU), ``report`` (the
per-sample table and summary every command writes). Import the submodules: this package imports
nothing itself, so training imports without Open3D (the GPU machine has none)."""
