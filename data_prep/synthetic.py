"""Synthetic training data: random faces from a 3D morphable model, posed, cropped, voxelised, rendered.

``python -m data_prep.synthetic --out DIR --split train=4000 --split val=200 --split test=500``
writes ``DIR/train.h5``, ``DIR/val.h5``, ``DIR/test.h5`` in the dataset file format
(:mod:`lightning_vrn.dataset_file`). Sample ``i`` of split ``s`` draws all its randomness from
``np.random.default_rng([seed, crc32(s), i])``, so a file is the same whatever ``--workers`` is,
and a killed run rerun with the same arguments continues where it stopped (``--restart`` starts over).

One sample, as the authors built theirs from 300W-LP:

- identity and expression from the face model; pose yaw uniform over +-90 degrees (the full
  300W-LP range), pitch and roll normal with standard deviations of 10 and 8 degrees, truncated at
  +-30 and +-25 (300W-LP's profiled faces are mostly near-upright);
- crop: scale and translate so the 68 projected landmarks' bounding box has
  ``sqrt(w * h) = 90/192 * crop`` pixels (times U(0.9, 1.1)) and is centred in the crop (plus up
  to +-3/192 of the crop of translation); depth: the mesh's nearest point is put at
  :data:`~lightning_vrn.geometry.crop.FRONT_MARGIN_FRACTION` of the grid's depth range, so the visible face always sits at the
  same depth and the network need not guess how deep the hidden back of the head goes (a
  convention that depends on the whole extent, like centring it, makes the absolute depth of the
  visible face a function of what the image does not show); the augmentation scales depth about
  the grid's front, so the face stays in front. A mesh deeper than the rest of the grid
  (the paper grid spans 100 px; a face near profile can span more) loses its hidden back;
- target: :func:`voxelise` of the posed mesh (optionally the frontal volume too); image:
  :func:`render` with random lighting, albedo, background (and occluders with ``--occluders P``);
- landmarks: the landmark vertices in crop coordinates; 2D = their x, y (orthographic projection);
- expression: the drawn blendshape weights and their :func:`~data_prep.face_model.expression_label`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.accessories import Accessories
from data_prep.arguments import add_grid_and_workers, unit_interval_argument
from data_prep.face_model import FaceModel, expression_label, load_face_model
from data_prep.head import HeadSettings
from data_prep.render import CAMERAS, LIGHTINGS, SKINS, RenderSettings, render, shade, texture_image
from data_prep.scene import cut_at_photo_edges, sample_photo_edges, scene_mesh
from data_prep.writing import check_finished, check_output, write_pending
from lightning_vrn import __version__
from lightning_vrn.cli import run_command
from lightning_vrn.dataset_file import DatasetWriter, open_dataset
from lightning_vrn.geometry.crop import LANDMARK_BOX_FRACTION, front_z_shift, landmark_crop, leaves_grid
from lightning_vrn.geometry.grid import VoxelGrid
from lightning_vrn.geometry.pose import crop_rotation, model_to_crop
from lightning_vrn.geometry.voxelise import voxelise, voxelise_frontal

CREATED_BY = f"lightning_vrn.data_prep.synthetic {__version__}"
POSE_LIMITS_DEG = (30.0, 90.0, 25.0)
"""Largest |pitch|, |yaw|, |roll| (degrees)."""
PITCH_ROLL_STD_DEG = (10.0, 8.0)
"""Standard deviations of the truncated normal pitch and roll distributions (degrees)."""
SCALE_JITTER = (0.9, 1.1)
TRANSLATION_JITTER_FRACTION = 3.0 / 192.0
"""Largest shift of the landmark box centre from the crop centre, as a fraction of the crop size."""
HEADS_VERSION = "skull, ears, neck, shoulders, hair"
"""What ``--heads`` draws, as recorded in a file's ``heads`` attribute (a file of the earlier flat heads, recorded
as True, is not taken for one of these)."""
PHOTO_EDGES = 0.9
"""Default share of samples cut by photo edges (``--photo-edges``): with two training seeds it lowered the make-demo
model's NME on the 190 aflw2000_val photos from 0.2349 / 0.2552 to 0.2184 / 0.2239 (paired -0.0165 [-0.0296,
-0.0041] and -0.0314 [-0.0466, -0.0158]), its synthetic test NME unchanged (benchmarks/results_synthetic_to_real.md)."""


@dataclass(frozen=True)
class ImageOptions:
    """What the generator's options change in the image alone (faces, poses, crops and volumes stay the same).

    ``occluder_prob``: probability that a sample gets occluders; ``camera``: one of
    :data:`~data_prep.render.CAMERAS`; ``heads``: a head around the face (:mod:`data_prep.head`);
    ``photo_edges``: probability that the crop reaches past the edges of the photo it was cut from (black
    beyond them, :func:`cut_at_photo_edges`; an edge may still fall outside the crop); ``lighting``: one of
    :data:`~data_prep.render.LIGHTINGS`; ``skin``: one of :data:`~data_prep.render.SKINS`; ``bystanders``: probability that one or two other people stand behind
    the face, partly in view (:func:`bystanders_behind`); ``accessories``: probability that the face wears one or two
    of glasses, a hat, a microphone, locks of hair (:mod:`data_prep.accessories`).
    """

    occluder_prob: float = 0.0
    camera: str = "basic"
    heads: bool = False
    photo_edges: float = PHOTO_EDGES
    lighting: str = "lambert"
    skin: str = "plain"
    bystanders: float = 0.0
    accessories: float = 0.0

    def attrs(self) -> dict:
        """The file attributes that record these options. ``occluder_prob`` is always recorded; the later options
        only when they change the image (``photo_edges`` above 0), so a file without them stays byte-identical to
        one made before the options existed (and a file without ``photo_edges`` is one made without edges)."""
        return {"occluder_prob": float(self.occluder_prob),
                **({} if self.camera == "basic" else {"camera": self.camera}),
                **({"heads": HEADS_VERSION} if self.heads else {}),
                **({"photo_edges": float(self.photo_edges)} if self.photo_edges else {}),
                **({} if self.lighting == "lambert" else {"lighting": self.lighting}),
                **({} if self.skin == "plain" else {"skin": self.skin}),
                **({"bystanders": float(self.bystanders)} if self.bystanders else {}),
                **({"accessories": float(self.accessories)} if self.accessories else {})}


FINISHED_KEYS = ("face_model", "face_model_spec", "seed", "occluder_prob", "camera", "heads", "photo_edges", "lighting",
                 "skin", "bystanders", "accessories", "split")
"""File attributes a finished file must share with a rerun's to be left as it is (:func:`check_finished`)."""


def split_code(split: str) -> int:
    """Stable integer for a split name (CRC-32), part of every sample's random seed."""
    return zlib.crc32(split.encode("utf-8"))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator all randomness of sample ``index`` of ``split`` comes from."""
    return np.random.default_rng([seed, split_code(split), index])


def sample_pose(rng: np.random.Generator) -> np.ndarray:
    """``(3,)`` pitch, yaw, roll in radians: yaw uniform, pitch and roll truncated normals (:data:`PITCH_ROLL_STD_DEG`)."""
    pitch_limit, yaw_limit, roll_limit = POSE_LIMITS_DEG
    yaw = rng.uniform(-yaw_limit, yaw_limit)
    pitch, roll = (_truncated_normal(rng, std, limit) for std, limit in zip(PITCH_ROLL_STD_DEG, (pitch_limit, roll_limit)))
    return np.radians([pitch, yaw, roll])


def _truncated_normal(rng: np.random.Generator, std: float, limit: float) -> float:
    """A normal draw with standard deviation ``std`` redrawn until ``|x| <= limit``."""
    while True:
        value = rng.normal(0.0, std)
        if abs(value) <= limit:
            return value


def crop_transform(mesh_mm: np.ndarray, landmark_vertices: np.ndarray, pose: np.ndarray, grid: VoxelGrid,
                   rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Scale (px/mm) and translation (crop px) placing the posed mesh in the crop as the authors did.

    :func:`~lightning_vrn.geometry.crop.landmark_crop` of the posed landmarks, with the box size
    jittered by a factor drawn from :data:`SCALE_JITTER` and its centre by up to
    :data:`TRANSLATION_JITTER_FRACTION` of the crop; the mesh's nearest point goes to :func:`~lightning_vrn.geometry.crop.front_z`.
    """
    size = grid.crop_size
    posed = model_to_crop(mesh_mm, pose, 1.0, np.zeros(3))  # (V, 3) at 1 px/mm, origin at 0
    scale_jitter = rng.uniform(*SCALE_JITTER)
    centre_shift = rng.uniform(-TRANSLATION_JITTER_FRACTION, TRANSLATION_JITTER_FRACTION, size=2) * size
    crop = landmark_crop(posed[landmark_vertices, :2], size, scale_jitter, centre_shift)
    z_shift = front_z_shift(grid, posed[:, 2], crop.scale)
    return crop.scale, np.append(crop.translation, z_shift)


def make_sample(model: FaceModel, grid: VoxelGrid, rng: np.random.Generator, with_frontal: bool = False,
                options: ImageOptions = ImageOptions()) -> dict[str, np.ndarray]:
    """One random sample as :meth:`DatasetWriter.write` takes it.

    Keys: ``image`` (S, S, 3) uint8, ``volume`` (D, H, W) bool (and ``volume_frontal`` when
    ``with_frontal``), ``landmarks_2d`` (68, 2) and ``landmarks_3d`` (68, 3) crop px, ``pose`` (3,)
    radians, ``vertices`` (V, 3) crop px, ``expression`` (K_exp,) blendshape weights (1 = the full
    expression), float32; ``expression_label`` uint8 (:func:`expression_label`). The face, pose,
    crop and volume do not depend on the image ``options`` or ``with_frontal``: the random draws of the face come
    first, in the same order regardless.
    """
    identity, expression = model.sample_coefficients(rng)
    mesh_mm = model.shape(identity, expression)
    pose = sample_pose(rng)
    scale, translation = crop_transform(mesh_mm, model.landmark_vertices, pose, grid, rng)
    vertices = model_to_crop(mesh_mm, pose, scale, translation)
    rotation = crop_rotation(pose)
    with_occluders = rng.random() < options.occluder_prob
    settings = RenderSettings.sample(rng, occluders=with_occluders, camera=options.camera, lighting=options.lighting,
                                     skin=options.skin)
    # The head's draws come last, so the face, pose, crop and render settings are those without a head.
    head = HeadSettings.sample(rng, settings.brow_colour) if options.heads else None
    edges = sample_photo_edges(rng) if options.photo_edges and rng.random() < options.photo_edges else None
    crowd = int(rng.integers(2**31)) if options.bystanders and rng.random() < options.bystanders else None
    worn = Accessories.sample(rng) if options.accessories and rng.random() < options.accessories else None  # last
    background = None if crowd is None else bystanders_behind(model, np.random.default_rng(crowd), grid.crop_size,
                                                               scale, settings, options)
    scene, triangles, albedo = scene_mesh(model, mesh_mm, identity, expression, settings, head, worn)
    image, _ = render(model_to_crop(scene, pose, scale, translation), triangles, albedo, grid.crop_size, settings,
                      face_triangles=len(model.triangles), background=background)
    if edges is not None:
        image = cut_at_photo_edges(image, vertices[model.landmark_vertices, :2], edges)
    return posed_sample(image, vertices, model.triangles, rotation, grid, vertices[model.landmark_vertices], pose,
                        with_frontal, expression=expression,
                        expression_label=np.uint8(expression_label(expression)))


def bystanders_behind(model: FaceModel, rng: np.random.Generator, size: int, scale: float, settings: RenderSettings,
                      options: ImageOptions) -> np.ndarray:
    """``(S, S, 3)`` float background: ``settings.background``'s texture with one or two other people of ``model``
    drawn over it (each its own identity, expression, pose, light and skin; a head when ``options.heads``), their
    landmark box centred 0.35-0.65 of the crop from its centre (partly in view) at 0.6-1.2 times the face's
    ``scale`` (px/mm). The face is drawn over all of it, so they are always behind."""
    background = texture_image(settings.background, size)
    for _ in range(int(rng.integers(1, 3))):
        identity, expression = model.sample_coefficients(rng)
        mesh_mm = model.shape(identity, expression)
        pose = sample_pose(rng)
        their_scale = scale * rng.uniform(0.6, 1.2)
        angle, distance = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.65) * size
        posed = model_to_crop(mesh_mm[model.landmark_vertices], pose, their_scale, np.zeros(3))
        centre = (size - 1) / 2 + distance * np.array([np.cos(angle), np.sin(angle)])
        translation = np.append(centre - 0.5 * (posed[:, :2].min(0) + posed[:, :2].max(0)), 0.0)
        their = RenderSettings.sample(rng, lighting=options.lighting, skin=options.skin)
        head = HeadSettings.sample(rng, their.brow_colour) if options.heads else None
        scene, triangles, albedo = scene_mesh(model, mesh_mm, identity, expression, their, head)
        background, _ = shade(model_to_crop(scene, pose, their_scale, translation), triangles, albedo, size, their,
                              background=background)
    return background


def posed_sample(image: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, rotation: np.ndarray, grid: VoxelGrid,
                 landmarks_3d: np.ndarray, pose: np.ndarray, with_frontal: bool, /, **extra) -> dict[str, np.ndarray]:
    """A :meth:`DatasetWriter.write` sample of a posed mesh in crop coordinates: ``volume`` (and, with
    ``with_frontal``, ``volume_frontal``) voxelised with the frontal->posed crop ``rotation``, 2D landmarks the
    x, y of ``landmarks_3d``, float32 arrays, then the ``extra`` keys (synthetic faces and scans alike; a scan's
    own ``triangles`` is one: the parameters are positional only)."""
    sample = {
        "image": image,
        "volume": voxelise(vertices, triangles, rotation, grid),
        "landmarks_2d": landmarks_3d[:, :2].astype(np.float32),
        "landmarks_3d": landmarks_3d.astype(np.float32),
        "pose": pose.astype(np.float32),
        "vertices": vertices.astype(np.float32),
        **extra,
    }
    if with_frontal:
        sample["volume_frontal"] = voxelise_frontal(vertices, triangles, rotation, grid)
    return sample


# --- generation ------------------------------------------------------------------------------------

def _setup(model_spec: str, grid: VoxelGrid, seed: int, split: str, with_frontal: bool, options: ImageOptions) -> dict:
    """State of a sample-making process (:func:`data_prep.writing.write_pending`): the face model is loaded once."""
    return dict(model=load_face_model(model_spec), grid=grid, seed=seed, split=split, with_frontal=with_frontal,
                options=options)


def _make(state: dict, index: int) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Sample ``index`` and its flag ``leaves_grid`` (:func:`leaves_grid`)."""
    sample = make_sample(state["model"], state["grid"], sample_rng(state["seed"], state["split"], index),
                         state["with_frontal"], state["options"])
    return sample, {"leaves_grid": leaves_grid(sample["vertices"], state["grid"])}


def _file_attrs(model: FaceModel, model_spec: str, seed: int, split: str, options: ImageOptions) -> dict:
    return {
        "face_model": model.name,
        "face_model_spec": model_spec,
        "source": "synthetic",
        "seed": int(seed),
        "split": split,
        "created_by": CREATED_BY,
        "pose_limits_deg": np.asarray(POSE_LIMITS_DEG),
        "landmark_box_fraction": LANDMARK_BOX_FRACTION,
        "scale_jitter": np.asarray(SCALE_JITTER),
        "translation_jitter_fraction": TRANSLATION_JITTER_FRACTION,
        **options.attrs(),
    }


def generate_split(out_path, model_spec: str, grid: VoxelGrid, num_samples: int, seed: int, split: str,
                   workers: int = 1, with_frontal: bool = False, options: ImageOptions = ImageOptions(),
                   progress: bool = True, restart: bool = False) -> Path:
    """Write ``num_samples`` synthetic samples of ``split`` to ``out_path`` (HDF5); returns the path.

    Resumes an unfinished ``<out_path>.partial`` written with the same arguments; ``restart``
    starts over (and replaces a finished file). A finished file with the same arguments is
    left as it is; one with other arguments is an error unless ``restart``. ``workers > 1``
    generates in spawned processes (the calling script needs ``if __name__ == "__main__":``);
    this process writes, in index order, so the file does not depend on ``workers``.
    """
    out_path = Path(out_path)
    model = load_face_model(model_spec)
    attrs = _file_attrs(model, model_spec, seed, split, options)
    if not restart and _finished_split(out_path, grid, num_samples, attrs, with_frontal):
        if progress:
            print(f"{out_path} is already complete; skipping (--restart regenerates it)", file=sys.stderr)
        return out_path
    with DatasetWriter(out_path, grid, num_samples, len(model.mean), model.triangles, model.face_region,
                       model.landmark_vertices, attrs, with_frontal=with_frontal, restart=restart,
                       flags=("leaves_grid",), expression_names=model.expression_label_names,
                       num_expression_coefficients=len(model.expression_basis)) as writer:
        write_pending(writer, _setup, (model_spec, grid, seed, split, with_frontal, options), _make, workers,
                      desc=split, progress=progress)
        writer.finish()
    clipped = int(open_dataset(out_path).attrs["num_leaves_grid"])  # every sample of the file, resumed or not
    if clipped:
        warnings.warn(f"{out_path}: {clipped} of {num_samples} faces reach outside grid {grid.describe()} "
                      f"(deep faces at large yaw and pitch; their hidden back is not in the volume)", stacklevel=2)
    return out_path


def _finished_split(out_path: Path, grid: VoxelGrid, num_samples: int, attrs: dict, with_frontal: bool) -> bool:
    """Whether ``out_path`` is a finished split made with these arguments (left as it is); FileExistsError when it was
    made otherwise (:func:`check_finished`)."""
    if out_path.exists():
        check_finished(out_path, grid, num_samples, attrs, FINISHED_KEYS, with_frontal, need_expression=True)
    return out_path.exists()


# --- command line ----------------------------------------------------------------------------------

def _parse_split(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name.strip() or not count.strip().isdigit() or int(count) <= 0:
        raise argparse.ArgumentTypeError(f"split must be NAME=COUNT with COUNT > 0, like train=4000; got {text!r}")
    return name.strip(), int(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder; writes OUT/NAME.h5 per split")
    parser.add_argument("--split", type=_parse_split, action="append", required=True, metavar="NAME=COUNT",
                        help="a split and its number of samples; repeat for several (train=4000 val=200 test=500)")
    parser.add_argument("--face-model", default="builtin", help="'builtin' (default), 'sfm:DIR', 'bfm:PATH' or 'ict:PATH.npz' (the ICT "
                             "Face Model: its whole head rendered, its face region voxelised)")
    parser.add_argument("--seed", type=int, default=0)
    add_grid_and_workers(parser, "processes generating samples")
    parser.add_argument("--frontal", action="store_true", help="also store frontal volumes (no-alignment ablation)")
    parser.add_argument("--occluders", type=unit_interval_argument("probability", include_one=True), default=0.0,
                        metavar="P", help="probability that a sample gets occluders (default 0)")
    parser.add_argument("--camera", choices=CAMERAS, default="basic",
                        help="basic: light defocus, noise, gamma; photographic: also white balance, stronger "
                             "defocus, lower resolution and JPEG (default basic; benchmarks/results_synthetic_to_real.md)")
    parser.add_argument("--lighting", choices=LIGHTINGS, default="lambert",
                        help="lambert: one directional light and a flat ambient; rich: also an ambient varying with "
                             "the normal, colour temperature, cast shadows, highlights (default lambert)")
    parser.add_argument("--skin", choices=SKINS, default="plain",
                        help="plain: skin tone, smooth variation, lips, eyes, brows; detailed: also pores, freckles, "
                             "moles, blush, eye shadow, stubble, teeth in an open mouth (default plain)")
    parser.add_argument("--heads", action="store_true",
                        help="draw a head around each face: skull, ears, neck, shoulders, hair (image only; the volume "
                             "stays the face's; data_prep/head.py, benchmarks/results_synthetic_to_real.md)")
    parser.add_argument("--photo-edges", type=unit_interval_argument("probability", include_one=True),
                        default=PHOTO_EDGES, metavar="P",
                        help=f"probability that the crop reaches past the photo's edges, black beyond them, as in most "
                             f"crops of real photos (default {PHOTO_EDGES}; 0: none; "
                             f"benchmarks/results_synthetic_to_real.md)")
    parser.add_argument("--bystanders", type=unit_interval_argument("probability", include_one=True), default=0.0,
                        metavar="P", help="probability that one or two other people stand behind the face, partly "
                                          "in view (default 0)")
    parser.add_argument("--accessories", type=unit_interval_argument("probability", include_one=True), default=0.0,
                        metavar="P", help="probability that the face wears one or two of glasses, a hat, a microphone, "
                                          "locks of hair (image only; data_prep/accessories.py; default 0)")
    parser.add_argument("--restart", action="store_true", help="discard unfinished or finished files and start over")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [name for name, _ in args.split]
    if len(set(names)) != len(names):
        parser.error(f"--split names must be distinct, got {names}")
    try:
        model = load_face_model(args.face_model)
    except (ValueError, OSError, KeyError) as err:
        parser.error(f"--face-model {args.face_model!r}: {err}")
    check_output(args.out, [args.out / f"{name}.h5" for name in names], args.restart)
    options = ImageOptions(occluder_prob=args.occluders, camera=args.camera, heads=args.heads,
                           photo_edges=args.photo_edges, lighting=args.lighting, skin=args.skin,
                           bystanders=args.bystanders, accessories=args.accessories)
    for name, count in [] if args.restart else args.split:  # every refusal comes before any split is written
        _finished_split(args.out / f"{name}.h5", args.grid, count,
                        _file_attrs(model, args.face_model, args.seed, name, options), args.frontal)
    for name, count in args.split:
        path = generate_split(args.out / f"{name}.h5", args.face_model, args.grid, count, args.seed, name,
                              workers=args.workers, with_frontal=args.frontal, options=options, restart=args.restart)
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
