"""Photos -> one coloured 3D mesh per face, with a picture per photo.

``python -m experiments.reconstruct PATH... --checkpoint CKPT [--landmarks DETECTOR.ckpt] [--out DIR]
[--batch-size N]``

``PATH``: image files or folders of them (searched recursively; ``.jpg``, ``.jpeg``, ``.png``, ``.ppm``).
``--checkpoint``: any trained volume model (VRN, VRN-Multitask, VRN-Guided, the ablations); a guided model needs
``--landmarks``, a trained ``landmark_hourglass``, which otherwise only places the crop. Each face goes through
:class:`lightning_vrn.faces.reconstruction.PhotoReconstructor` (detect, landmarks, the authors' crop, the model's
iso-surface, back to the photo's pixel coordinates, colours from the photo). Writes into ``--out`` (default
``reconstructions/``):

- ``STEM_faceK.obj`` and ``STEM_faceK.ply`` for face ``K`` (0 = the detector's most confident) of photo ``STEM``:
  vertices in the photo's pixels (x right, y down, z away from the camera in the same pixels), vertex colours;
- ``STEM.png``: the photo, the meshes drawn over it, and a side view of each face;
- ``report.csv``: one row per face, or per photo without one: photo (its absolute path), output (the ``STEM`` of
  its files), face, status (``ok`` or the reason), box ``x0 y0 x1 y1`` and detector score, landmark source,
  seconds (its batch's time per photo), mesh file;
- ``reconstruct.json``: the checkpoints used (paths and SHA-256).

A photo without a face, an unreadable file, a face too small to crop and a photo whose reconstruction raised each
get a row and a line, and the run goes on. Rerun with the same ``--out`` to resume: photos already in
``report.csv`` are skipped and keep their file names (a new photo whose stem is taken gets the stem plus a hash
of its path); a rerun with other checkpoints is refused. Every file is written under a temporary name and
renamed, the report after each batch. docs/reconstruct.md says what quality to expect.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from lightning_vrn.atomic import file_sha256, write_text
from lightning_vrn.cli import one_line, run_command
from lightning_vrn.faces.photo import read_photo
from lightning_vrn.faces.reconstruction import PhotoFace, PhotoReconstructor
from lightning_vrn.geometry.mesh_io import write_obj, write_ply
from lightning_vrn.models import load_model
from lightning_vrn.visualise import draw_mesh_over, save_comparison, shade_mesh

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm")
REPORT_COLUMNS = ("photo", "output", "face", "status", "box", "score", "landmark_source", "seconds", "mesh")
SIDE_VIEW_PX = 256


def find_photos(paths: Sequence[Path], out: Path) -> list[Path]:
    """The absolute paths of the image files named or inside the named folders (recursively, sorted; hidden files
    and anything under ``out`` left out); a missing path is an error."""
    out = out.resolve()
    photos = []
    for path in paths:
        if path.is_dir():
            photos += sorted(p.resolve() for p in path.rglob("*")
                             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                             and out not in p.resolve().parents)
        elif path.is_file():
            photos.append(path.resolve())
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(dict.fromkeys(photos))


def output_stems(photos: Sequence[Path], taken: set[str]) -> dict[Path, str]:
    """Each photo's output name: its stem, or when that is ``taken`` (by an earlier photo of this run or of the
    report) the stem and 8 hex digits of its path's SHA-1, so a name never changes once given."""
    taken, stems = set(taken), {}
    for photo in photos:
        stem = photo.stem
        if stem in taken:
            stem = f"{photo.stem}_{hashlib.sha1(str(photo).encode()).hexdigest()[:8]}"
        stems[photo] = stem
        taken.add(stem)
    return stems


def check_run_record(out: Path, record: dict) -> None:
    """Write ``out/reconstruct.json`` (the checkpoints), or refuse when an earlier run there used others (by their
    SHA-256)."""
    path = out / "reconstruct.json"
    if path.is_file():
        earlier = json.loads(path.read_text())

        def contents(entries: dict) -> dict:  # a moved checkpoint is the same checkpoint
            return {name: entry and entry["sha256"] for name, entry in entries.items()}

        if contents(earlier) != contents(record):
            raise ValueError(f"{out} holds meshes of other checkpoints ({path}: {earlier}): choose another --out, or "
                             f"rerun with the same --checkpoint and --landmarks to resume")
    else:
        write_text(path, json.dumps(record, indent=2) + "\n")


def read_report(path: Path) -> list[dict[str, str]]:
    """The rows of an earlier run's ``report.csv`` (none when there is none)."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and set(rows[0]) != set(REPORT_COLUMNS):
        raise ValueError(f"{path} is not a report of this command (columns {sorted(rows[0])}): choose another --out")
    return rows


def write_report(path: Path, rows: list[dict[str, str]]) -> None:
    """All rows, written to a temporary name and renamed."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def face_row(photo: Path, stem: str, index: int, face: PhotoFace, seconds: float, mesh: str) -> dict[str, str]:
    """The report row of one face."""
    return {"photo": str(photo), "output": stem, "face": str(index), "status": face.status,
            "box": " ".join(f"{v:.1f}" for v in face.box.box), "score": f"{face.box.score:.3f}",
            "landmark_source": face.landmark_source, "seconds": f"{seconds:.2f}", "mesh": mesh}


def photo_row(photo: Path, stem: str, status: str, seconds: float) -> dict[str, str]:
    """The report row of a photo without a face to report."""
    return {**dict.fromkeys(REPORT_COLUMNS, ""), "photo": str(photo), "output": stem, "status": status,
            "seconds": f"{seconds:.2f}"}


def side_view(face: PhotoFace, size: int = SIDE_VIEW_PX) -> np.ndarray:
    """``(size, size, 3)`` shaded picture of the face's mesh turned 90 degrees about the vertical (nose to the
    right), scaled to fit."""
    centred = face.vertices - face.vertices.mean(axis=0)
    turned = np.stack([-centred[:, 2], centred[:, 1], centred[:, 0]], axis=1)
    extent = np.ptp(turned[:, :2], axis=0).max()
    placed = turned * (0.9 * (size - 1) / max(extent, 1e-9))
    placed[:, :2] += (size - 1) / 2
    return shade_mesh(placed, face.triangles, size)


def save_picture(path: Path, image: np.ndarray, faces: list[PhotoFace]) -> None:
    """The photo, its meshes drawn over it, and each face's side view, side by side."""
    overlay = image
    for face in faces:
        overlay = draw_mesh_over(overlay, face.vertices, face.triangles)
    panels = {"meshes over the photo": overlay}
    panels.update({f"face {k}, side": side_view(face) for k, face in enumerate(faces)})
    save_comparison(path, image, panels, title=path.stem)


def reconstruct_each(reconstructor: PhotoReconstructor, images: dict[Path, np.ndarray]) -> dict[Path, list | str]:
    """Each photo's faces, in one batch; if the batch raises, photo by photo, and a photo that raises gets the
    error's line instead of its faces (one bad photo must not stop a run, or every rerun at the same place)."""
    try:
        return dict(zip(images, reconstructor.reconstruct(list(images.values()))))
    except Exception as error:
        if len(images) == 1:
            return {photo: f"error: {type(error).__name__}: {one_line(error)}" for photo in images}
        results = {}
        for photo, image in images.items():
            results.update(reconstruct_each(reconstructor, {photo: image}))
        return results


def reconstruct_batch(reconstructor: PhotoReconstructor, photos: list[Path], stems: dict[Path, str],
                      out: Path, say) -> list[dict[str, str]]:
    """Reconstruct a batch of photos, write their meshes and pictures, and return their report rows."""
    start = time.perf_counter()
    images, rows = {}, {}
    for photo in photos:
        try:
            images[photo] = read_photo(photo)
        except ValueError as error:
            rows[photo] = [photo_row(photo, stems[photo], str(error), 0.0)]
    results = reconstruct_each(reconstructor, images) if images else {}
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    for photo, faces in results.items():
        stem = stems[photo]
        if isinstance(faces, str) or not faces:
            rows[photo] = [photo_row(photo, stem, faces or "no face found", seconds)]
            continue
        rows[photo] = []
        for k, face in enumerate(faces):
            mesh = ""
            if face.status == "ok":
                mesh = f"{stem}_face{k}.obj"
                write_obj(out / mesh, face.vertices, face.triangles, face.colours)
                write_ply((out / mesh).with_suffix(".ply"), face.vertices, face.triangles, face.colours)
            rows[photo].append(face_row(photo, stem, k, face, seconds, mesh))
        meshed = [face for face in faces if face.status == "ok"]
        if meshed:
            save_picture(out / f"{stem}.png", images[photo], meshed)
    for photo in photos:
        for row in rows[photo]:
            if row["status"] != "ok":
                say(f"{photo}: {'face ' + row['face'] + ': ' if row['face'] else ''}{row['status']}")
    return [row for photo in photos for row in rows[photo]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained volume model")
    parser.add_argument("--landmarks", type=Path, help="a trained landmark_hourglass checkpoint")
    parser.add_argument("--out", type=Path, default=Path("reconstructions"))
    parser.add_argument("--batch-size", type=int, default=8, help="photos per batch (default 8)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    photos = find_photos(args.paths, args.out)
    if not photos:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} image in {' '.join(map(str, args.paths))}")
    model = load_model(args.checkpoint)
    reconstructor = PhotoReconstructor(model, load_model(args.landmarks) if args.landmarks else None)
    record = {name: None if path is None else {"path": str(path.resolve()), "sha256": file_sha256(path)}
              for name, path in (("checkpoint", args.checkpoint), ("landmarks", args.landmarks))}
    if model.target_frame == "frontal":
        print(f"{args.checkpoint} predicts frontal volumes (no alignment): its meshes face the camera, "
              f"not the photo's pose", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    check_run_record(args.out, record)
    report = args.out / "report.csv"
    rows = read_report(report)
    done = {row["photo"] for row in rows}
    todo = [photo for photo in photos if str(photo) not in done]
    if len(todo) < len(photos):
        print(f"resuming: {len(photos) - len(todo)} of {len(photos)} photos already in {report}", file=sys.stderr)
    stems = output_stems(todo, {row["output"] for row in rows})
    with tqdm(total=len(todo), desc="photos", unit="photo") as progress:
        for first in range(0, len(todo), args.batch_size):
            batch = todo[first:first + args.batch_size]
            rows += reconstruct_batch(reconstructor, batch, stems, args.out,
                                      lambda line: progress.write(line, file=sys.stderr))
            write_report(report, rows)
            progress.update(len(batch))
    meshes = sum(row["status"] == "ok" for row in rows)
    print(f"{meshes} meshes from {len({row['photo'] for row in rows})} photos in {args.out} (report: {report})")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
