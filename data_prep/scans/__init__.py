"""Real textured 3D scans (Florence / MICC, BU-4DFE) -> test samples with per-sample ground truth (docs/datasets_scans.md).

Per scan (:func:`~data_prep.scans.cache.prepare_scan`, once, cached as ``.npz`` with its
:func:`~data_prep.scans.cache.cache_key`):

- read the textured mesh (:func:`~data_prep.scans.reading.read_textured_mesh`) and sample its
  texture at the vertices (per-vertex albedo: the mean of the bilinear texture samples of the
  vertex's triangle corners); the scan's frame must be the model frame (y up, z towards the camera,
  as both datasets ship them); triangles are reversed when most of the surface faces away from +z;
- 68 landmarks in the scan's frame: from a per-scan file (68x3 on the scan, or 68x2 pixels on the
  frontal render, :func:`~data_prep.scans.landmarks.frontal_view`), or detected by a landmark checkpoint
  on the frontal render (:class:`~data_prep.scans.landmarks.LandmarkDetector`); 2D landmarks are lifted
  to 3D through the render's depth;
- the face region: the triangles whose three vertices lie within
  :data:`~data_prep.scans.landmarks.FACE_RADIUS_RATIO` outer interocular distances (landmarks 37 and
  46, 1-based) of the nose tip (landmark 31, 1-based).

Per sample (:func:`~data_prep.scans.conversion.make_scan_sample`: one scan at one pose): rotate the whole
scan by the pose, crop it by its 68-landmark box as the synthetic data is
(:func:`lightning_vrn.geometry.crop.landmark_crop`, no jitter), put the face region's nearest point at
:func:`lightning_vrn.geometry.crop.front_z` (:func:`~lightning_vrn.geometry.crop.front_z_shift`), render
the whole textured scan with a random light direction and colour over a random background, and voxelise
the face region aligned with the image. The sample's ``vertices`` / ``triangles`` are the face region in
crop coordinates (its own topology), ``landmarks_3d`` the lifted landmarks (the NME's interocular distance).

:func:`~data_prep.scans.conversion.convert` runs both passes in parallel and resumably, and skips and
reports scans that cannot be used (unreadable file, missing texture, no face found) without stopping.

Modules: :mod:`~data_prep.scans.reading` (finding and reading scans), :mod:`~data_prep.scans.landmarks`
(frontal render, landmarks, face region), :mod:`~data_prep.scans.cache` (prepared scans and their keys),
:mod:`~data_prep.scans.conversion` (samples, the output file, the shared command line).
"""
