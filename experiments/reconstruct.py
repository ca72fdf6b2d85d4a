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
- ``report.csv``: one row per face, or per photo without one: photo, face, status (``ok`` or the reason), box
  ``x0 y0 x1 y1`` and detector score, landmark source, seconds, mesh file.

A photo without a face, an unreadable file and a face too small to crop each get a row and a line, and the run
goes on. Rerun with the same ``--out`` to resume: photos already in ``report.csv`` are skipped (every file is
written under a temporary name and renamed, and the report after each batch). docs/reconstruct.md says what quality
to expect.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from lightning_vrn.atomic import write_text
from lightning_vrn.cli import run_command
from lightning_vrn.faces.reconstruction import PhotoFace, PhotoReconstructor
from lightning_vrn.geometry.mesh_io import write_obj, write_ply
from lightning_vrn.models import load_model
from lightning_vrn.visualise import draw_mesh_over, save_comparison, shade_mesh

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm")
REPORT_COLUMNS = ("photo", "face", "status", "box", "score", "landmark_source", "seconds", "mesh")
SIDE_VIEW_PX = 256


def find_photos(paths: Sequence[Path]) -> list[Path]:
    """The image files named or inside the named folders (recursively, sorted); a missing path is an error."""
    photos = []
    for path in paths:
        if path.is_dir():
            photos += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            photos.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(dict.fromkeys(photos))


def output_stems(photos: list[Path]) -> dict[Path, str]:
    """Each photo's output name: its stem, or ``stem_suffix`` then its position where stems repeat."""
    counts: dict[str, int] = {}
    for photo in photos:
        counts[photo.stem] = counts.get(photo.stem, 0) + 1
    stems, taken = {}, set()
    for index, photo in enumerate(photos):
        stem = photo.stem if counts[photo.stem] == 1 else f"{photo.stem}_{photo.suffix.lstrip('.').lower()}"
        stems[photo] = stem if stem not in taken else f"{stem}_{index}"
        taken.add(stems[photo])
    return stems


def read_photo(path: Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB; a clear ValueError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"unreadable image ({error})") from error


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


def face_row(photo: Path, index: int, face: PhotoFace, seconds: float, mesh: str) -> dict[str, str]:
    """The report row of one face."""
    return {"photo": str(photo), "face": str(index), "status": face.status,
            "box": " ".join(f"{v:.1f}" for v in face.box.box), "score": f"{face.box.score:.3f}",
            "landmark_source": face.landmark_source, "seconds": f"{seconds:.2f}", "mesh": mesh}


def photo_row(photo: Path, status: str, seconds: float) -> dict[str, str]:
    """The report row of a photo without a face to report."""
    return {**dict.fromkeys(REPORT_COLUMNS, ""), "photo": str(photo), "status": status, "seconds": f"{seconds:.2f}"}


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


def reconstruct_batch(reconstructor: PhotoReconstructor, photos: list[Path], stems: dict[Path, str],
                      out: Path, say) -> list[dict[str, str]]:
    """Reconstruct a batch of photos, write their meshes and pictures, and return their report rows."""
    start = time.perf_counter()
    images, rows = {}, {}
    for photo in photos:
        try:
            images[photo] = read_photo(photo)
        except ValueError as error:
            rows[photo] = [photo_row(photo, str(error), 0.0)]
    results = reconstructor.reconstruct(list(images.values())) if images else []
    seconds = (time.perf_counter() - start) / max(len(images), 1)
    for (photo, image), faces in zip(images.items(), results):
        if not faces:
            rows[photo] = [photo_row(photo, "no face found", seconds)]
            continue
        rows[photo] = []
        for k, face in enumerate(faces):
            mesh = ""
            if face.status == "ok":
                mesh = f"{stems[photo]}_face{k}.obj"
                write_obj(out / mesh, face.vertices, face.triangles, face.colours)
                write_ply((out / mesh).with_suffix(".ply"), face.vertices, face.triangles, face.colours)
            rows[photo].append(face_row(photo, k, face, seconds / len(faces), mesh))
        meshed = [face for face in faces if face.status == "ok"]
        if meshed:
            save_picture(out / f"{stems[photo]}.png", image, meshed)
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
    photos = find_photos(args.paths)
    if not photos:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} image in {' '.join(map(str, args.paths))}")
    model = load_model(args.checkpoint)
    reconstructor = PhotoReconstructor(model, load_model(args.landmarks) if args.landmarks else None)
    if model.target_frame == "frontal":
        print(f"{args.checkpoint} predicts frontal volumes (no alignment): its meshes face the camera, "
              f"not the photo's pose", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "report.csv"
    rows = read_report(report)
    done = {row["photo"] for row in rows}
    todo = [photo for photo in photos if str(photo) not in done]
    if done:
        print(f"resuming: {len(photos) - len(todo)} of {len(photos)} photos already in {report}", file=sys.stderr)
    stems = output_stems(photos)
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
