# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Build the bundle's ``datalist.json`` from a folder of images and a folder of masks, or generate the demo set.

    python -m scripts.prepare_data --images DIR --masks DIR --output DIR [--split-file FILE] [--seed N]
    python -m scripts.prepare_data --root Kvasir-SEG --output DIR        # official layouts, found by name
    python -m scripts.prepare_data --root DRIVE --output DIR             # also CHASE_DB1, STARE, HRF: FOV masks
    python -m scripts.prepare_data --root SUN-SEG/TestEasyDataset/Seen --output DIR --test-fraction 1   # clips
    python -m scripts.prepare_data --images DIR --masks DIR --clip-table clips.csv --output DIR
    python -m scripts.prepare_data --demo --output DIR

Images and masks are paired by file stem and every pair is read once, so that a corrupt file, a mask of the
wrong size or an image without a mask stops here, naming the file, instead of in the middle of training.
Masks without an image are left out and listed as warnings. Every failure ends with one line, ``error: ...``,
and exit status 2.

The retinal vessel sets are taken as released, with their official test images (STARE and HRF have none: the
split chosen for each is documented in docs/README.md) and a field of view per image (``fov`` in the datalist):
the masks DRIVE and HRF ship, and for CHASE_DB1 and STARE, which ship none, masks derived from the image
(``scripts.data.field_of_view``) and written to ``OUTPUT/fov``. STARE's gzip-compressed files (``im0001.ppm.gz``)
are decompressed into ``OUTPUT/unpacked``; the data folder is only read.

Frames of colonoscopy videos get the ``clip`` they come from in the datalist (evaluation then also scores each
clip: ``scripts.reports.ClipMetricsSaver``): SUN-SEG's ``Frame/<clip>/*.jpg`` with ``GT/<clip>/*.png`` (``--root``
the folder that holds both, e.g. ``TrainDataset`` or ``TestEasyDataset/Seen``), CVC-ClinicDB's published
frame-to-sequence table for its ``Original/`` + ``Ground Truth/`` release, or, for any layout, ``--clip-table``: a
CSV file with the columns ``frame`` (an image's file stem) and ``clip``. A clip's frames stay together on one side
of the split and are listed in natural order (``2.jpg`` before ``10.jpg``), clip by clip.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import gzip
import logging
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.data import (
    FOV_LEVEL,
    IMAGE_SUFFIXES,
    LABEL_INDEX_MAX,
    PILTiffReader,
    check_pairs,
    field_of_view,
    find_pairs,
    natural_key,
    split_pairs,
    unpaired_masks,
    write_datalist,
)
from scripts.errors import InputError
from scripts.files import atomic_path, check_output_dir

# (images, masks) sub-folders of the official releases and of this bundle's demo set, tried in order.
KNOWN_LAYOUTS = (("images", "masks"), ("Original", "Ground Truth"), ("original", "ground truth"))
# CHASE_DB1 as released, one folder: Image_01L.jpg (child 01, left eye), the first observer's Image_01L_1stHO.png
# (the usual ground truth) and the second's Image_01L_2ndHO.png; the usual protocol tests on children 11-14
CHASE_ID = r"Image_\d+[LR]"
CHASE_FIRST_TEST_CHILD = 11
# STARE's vessel release: im0001.ppm (or .ppm.gz) in one folder, Adam Hoover's labels-ah/im0001.ah.ppm (the usual
# ground truth) and Valentina Kouznetsova's labels-vk/im0001.vk.ppm. It has no official split; the bundle trains
# and tests one model, so the 20 labelled images are halved in order of number (not leave-one-out)
STARE_ID = r"im\d{4}"
STARE_FIRST_TEST = 162  # im0162, the 11th of the 20
STARE_SPLIT = ("the bundle's: the first 10 labelled images by number (im0001-im0139) train, the last 10 "
               "(im0162-im0324) test")
# HRF: images/01_dr.JPG (15 images each of diabetic retinopathy, dr, glaucoma, g, and healthy eyes, h),
# manual1/01_dr.tif (the ground truth) and mask/01_dr_mask.tif (the field of view, shipped). No official split
HRF_ID = r"\d{2}_(?:dr|g|h)"
HRF_TRAIN_PER_CATEGORY = 5  # images 01-05 of each category train, 06-15 test: both sides hold the categories equally
HRF_SPLIT = "the bundle's: images 01-05 of each category (dr, g, h) train, 06-15 test"
# SUN-SEG (Ji et al., MIR 2022): Frame/<clip>/*.jpg and GT/<clip>/*.png, in TrainDataset/ and in each of the test
# folders (TestEasyDataset/Seen, ...); frames and masks share their stems
SUNSEG_FOLDERS = ("Frame", "GT")
# CVC-ClinicDB as released: frames 1.tif ... 612.tif from 29 sequences; the first frame of each sequence, from the
# table of the release's README (sequence 1: frames 1-25, ..., sequence 29: frames 592-612)
CVC_CLINICDB_SEQUENCE_STARTS = (1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318, 343, 364,
                                384, 409, 429, 448, 467, 479, 504, 529, 547, 572, 592)
CVC_CLINICDB_FRAMES = 612
GZIP_SUFFIX = ".gz"
FOV_RULE = (f"derived from the image (scripts.data.field_of_view): brightest channel > {FOV_LEVEL}, largest connected "
            "component, holes filled, no erosion")


@dataclass
class Layout:
    """
    A data set as found on disk: the :func:`find_pairs` arguments of each of its parts (DRIVE has two: training/
    and test/; SUN-SEG one per clip), which images its split tests (None: no fixed split; the seeded fractions
    apply) and, for a set with no official split, the rule the bundle chose (``split``; None: the release's own),
    the subject of each image (kept on one side of a split), the video clip of each image (``clip``: the datalist's
    ``clip``; the split keeps a clip on one side when ``group`` is None), whether fields of view must be derived
    and whether its files may be gzip-compressed (STARE: see :func:`unpack_gzipped`).
    """

    name: str
    parts: list[dict] = field(default_factory=list)
    is_test: Callable[[Path], bool] | None = None
    group: Callable[[Path], Hashable] | None = None
    derive_fov: bool = False
    gzipped: bool = False
    split: str | None = None
    clip: Callable[[Path], str] | None = None


def find_layout(root: Path) -> Layout:
    """
    The layout of a data set root laid out as an official release: DRIVE, CHASE_DB1, STARE, HRF, SUN-SEG or a
    polyp set (CVC-ClinicDB's frames numbered 1-612 in ``Original/`` get their sequences as clips).
    """
    if all((root / folder).is_dir() for folder in SUNSEG_FOLDERS):
        return _sunseg_layout(root)
    if (root / "training" / "images").is_dir() and (root / "training" / "1st_manual").is_dir():
        return Layout("DRIVE", [_drive_part(root, part) for part in ("training", "test")],
                      is_test=lambda image: image.parent.parent.name == "test")
    if any(re.fullmatch(CHASE_ID + "_1stHO", p.stem) for p in root.glob("Image_*") if p.is_file()):
        names = {"image": "{id}", "label": "{id}_1stHO", "label_2nd": "{id}_2ndHO"}
        child = lambda image: int(re.search(r"\d+", image.stem)[0])  # noqa: E731
        return Layout("CHASE_DB1", [{"images_dir": root, "masks_dir": root, "names": names,
                                     "extra": {"label_2nd": root}, "id_pattern": CHASE_ID}],
                      is_test=lambda image: child(image) >= CHASE_FIRST_TEST_CHILD, group=child, derive_fov=True)
    if (root / "labels-ah").is_dir():
        return _stare_layout(root)
    if all((root / folder).is_dir() for folder in ("images", "manual1", "mask")):
        names = {"image": "{id}", "label": "{id}", "fov": "{id}_mask"}
        return Layout("HRF", [{"images_dir": root / "images", "masks_dir": root / "manual1", "names": names,
                               "extra": {"fov": root / "mask"}, "id_pattern": HRF_ID}],
                      is_test=lambda image: int(image.stem[:2]) > HRF_TRAIN_PER_CATEGORY, split=HRF_SPLIT)
    for images, masks in KNOWN_LAYOUTS:
        if (root / images).is_dir() and (root / masks).is_dir():
            part = {"images_dir": root / images, "masks_dir": root / masks}
            if images.lower() == "original" and _numbered_1_to_612(root / images):
                return Layout("CVC-ClinicDB", [part], clip=cvc_clinicdb_sequence)
            return Layout(f"{images} + {masks}", [part])
    expected = " or ".join(f"'{i}' + '{m}'" for i, m in KNOWN_LAYOUTS[:2])
    # SUN-SEG's release nests Frame/ + GT/ a level or two down (TrainDataset/, TestEasyDataset/Seen/, ...)
    nested = sorted(str(p.parent) for p in (*root.glob("*/Frame"), *root.glob("*/*/Frame"))
                    if (p.parent / "GT").is_dir())
    hint = f"; SUN-SEG's Frame/ + GT/ are in {', '.join(nested[:4])}: pass one of them as --root" if nested else ""
    raise FileNotFoundError(f"{root} holds none of the known layouts ({expected}, DRIVE's training/ + test/, "
                            "CHASE_DB1's Image_NNx.jpg + Image_NNx_1stHO.png, STARE's labels-ah/, HRF's images/ + "
                            f"manual1/ + mask/, SUN-SEG's Frame/ + GT/){hint or '; pass --images and --masks'}.")


def _sunseg_layout(root: Path) -> Layout:
    """SUN-SEG: one part per clip, ``Frame/<clip>`` with ``GT/<clip>``, the clip the folder's name."""
    frames, masks = (root / folder for folder in SUNSEG_FOLDERS)
    clips = sorted((p for p in frames.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
    if not clips:
        raise InputError(f"SUN-SEG folder {frames} holds no clip folder; it must hold a folder of frames per clip "
                         f"(Frame/<clip>/*.jpg, with the masks in GT/<clip>/*.png).")
    for clip in clips:
        if not (masks / clip.name).is_dir():
            raise InputError(f"SUN-SEG clip {clip.name} has frames in {clip} but no mask folder {masks / clip.name}; "
                             f"add the clip's masks (GT/{clip.name}/<frame stem>.png) or move its frames out.")
    return Layout("SUN-SEG", [{"images_dir": clip, "masks_dir": masks / clip.name} for clip in clips],
                  clip=lambda image: image.parent.name)


def _numbered_1_to_612(folder: Path) -> bool:
    """Whether every image of ``folder`` is named by a frame number of CVC-ClinicDB (1-612), as released."""
    stems = [p.stem for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return bool(stems) and all(s.isascii() and s.isdigit() and 1 <= int(s) <= CVC_CLINICDB_FRAMES for s in stems)


def cvc_clinicdb_sequence(image: Path) -> str:
    """The sequence (clip) of CVC-ClinicDB frame ``image`` (``26.tif`` -> ``"2"``), from the release's table."""
    return str(bisect.bisect_right(CVC_CLINICDB_SEQUENCE_STARTS, int(image.stem)))


def read_clip_table(path: Path, images: Sequence[Path]) -> dict[str, str]:
    """
    The clip of each of ``images`` by its file stem, from the CSV file ``path`` (``--clip-table``): a header row
    with the columns ``frame`` (an image's file stem, or its file name) and ``clip``, then one row per frame; other
    columns are ignored. Every image needs a row and every row an image: an :class:`InputError` names the file and
    the first rows or frames at fault otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--clip-table {path} {'is a folder' if path.is_dir() else 'does not exist'}; pass a CSV file "
                         "with the columns frame,clip.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"clip table {path} cannot be read as CSV ({type(e).__name__}: {e}); write it as UTF-8 "
                         "text with the columns frame,clip.") from e
    lacking = [c for c in ("frame", "clip") if c not in columns]
    if lacking:
        raise InputError(f"clip table {path} has no column {' or '.join(lacking)} (its header: "
                         f"{', '.join(columns) or 'none'}); it needs the header row frame,clip and then one row per "
                         "frame: its file stem and its clip.")
    stems = {p.stem for p in images}
    by_name = {p.name: p.stem for p in images}
    table: dict[str, str] = {}
    for line, row in enumerate(rows, 2):
        frame, clip = row["frame"], row["clip"]
        stem = frame if frame in stems else by_name.get(frame, frame)
        if not frame or not clip:
            raise InputError(f"row {line} of clip table {path} has no {'frame' if not frame else 'clip'}; every row "
                             "needs a frame (its file stem) and its clip.")
        if table.get(stem, clip) != clip:
            raise InputError(f"clip table {path} puts frame {frame} in two clips, {table[stem]} and {clip} (row "
                             f"{line}); a frame belongs to one clip.")
        table[stem] = clip
    unknown = [frame for frame in table if frame not in stems]
    if unknown:
        raise InputError(f"clip table {path} names {len(unknown)} frame(s) that are not among the images: "
                         f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; remove their rows, or check "
                         f"the frame column (file stems such as {min(stems, key=natural_key)}).")
    missing = sorted((s for s in stems if s not in table), key=natural_key)
    if missing:
        raise InputError(f"{len(missing)} image(s) have no row in clip table {path}: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}; add a row frame,clip for each.")
    return table


def _stare_layout(root: Path) -> Layout:
    """
    STARE as released on its vessel page: the images ``im0001.ppm`` (``.ppm.gz`` as downloaded) in ``root`` or
    in one of its folders (``stare-images/``, say), ``labels-ah/im0001.ah.ppm`` (the ground truth) and, where
    present, ``labels-vk/im0001.vk.ppm`` (the second observer, ``label_2nd``).
    """
    is_image = re.compile(STARE_ID + r"\.ppm(\.gz)?", re.IGNORECASE)
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("labels-"))]
    images = next((f for f in folders if any(is_image.fullmatch(p.name) for p in f.iterdir())), None)
    if images is None:
        raise FileNotFoundError(f"{root} has STARE's labels-ah/ but no folder of its images (im0001.ppm or "
                                "im0001.ppm.gz) beside it; put the images in it or in one of its folders.")
    names = {"image": "{id}", "label": "{id}.ah", "label_2nd": "{id}.vk"}
    extra = {"label_2nd": root / "labels-vk"} if (root / "labels-vk").is_dir() else {}
    number = lambda image: int(image.stem[2:6])  # noqa: E731  (im0162 -> 162)
    return Layout("STARE", [{"images_dir": images, "masks_dir": root / "labels-ah", "names": names, "extra": extra,
                             "id_pattern": STARE_ID}],
                  is_test=lambda image: number(image) >= STARE_FIRST_TEST, derive_fov=True, gzipped=True,
                  split=STARE_SPLIT)


def _drive_part(root: Path, part: str) -> dict:
    """
    The :func:`find_pairs` arguments of DRIVE's ``training`` or ``test`` folder: images/NN_<part>.tif with
    1st_manual/NN_manual1.gif (the ground truth), mask/NN_<part>_mask.gif (the field of view, shipped) and,
    where the release has it (test/ only), 2nd_manual/NN_manual2.gif.
    """
    folder = root / part
    names = {"image": f"{{id}}_{part}", "label": "{id}_manual1", "fov": f"{{id}}_{part}_mask"}
    extra = {"fov": folder / "mask"}
    if (folder / "2nd_manual").is_dir():
        names["label_2nd"], extra["label_2nd"] = "{id}_manual2", folder / "2nd_manual"
    return {"images_dir": folder / "images", "masks_dir": folder / "1st_manual", "names": names, "extra": extra}


def unpack_gzipped(layout: Layout, output: Path) -> tuple[Layout, int]:
    """
    ``layout`` with every folder of its parts that holds gzip-compressed images (STARE's ``im0001.ppm.gz``, which
    no image reader opens) replaced by its decompressed copy ``output/unpacked/<folder name>``, and the number of
    files decompressed. Into the output folder, never beside the data (it may be read-only or shared), and once,
    here, rather than at every read in training. A folder is copied whole, so that one half decompressed by hand
    still pairs: its plain images are copied along, a plain file standing in for its own ``.gz`` twin
    (``gunzip -k`` keeps both). Each file is written atomically: never half a file.
    """
    unpacked = 0

    def unpack(folder: Path) -> Path:
        nonlocal unpacked
        files = {p.name.lower(): p for p in sorted(Path(folder).iterdir()) if p.is_file()}
        plain = [p for p in files.values() if p.suffix.lower() in IMAGE_SUFFIXES]
        gzipped = [p for name, p in files.items() if name.endswith(GZIP_SUFFIX) and
                   Path(p.stem).suffix.lower() in IMAGE_SUFFIXES and p.stem.lower() not in files]
        if not gzipped:
            return folder
        target = output / "unpacked" / Path(folder).name
        for source in plain:
            with atomic_path(target / source.name) as tmp:
                shutil.copyfile(source, tmp)
        for source in gzipped:
            _gunzip(source, target / source.stem)
        unpacked += len(gzipped)
        return target

    parts = [{**part, "images_dir": unpack(part["images_dir"]), "masks_dir": unpack(part["masks_dir"]),
              "extra": {key: unpack(folder) for key, folder in part.get("extra", {}).items()}}
             for part in layout.parts]
    return replace(layout, parts=parts), unpacked


def _gunzip(source: Path, target: Path) -> None:
    """Decompress the gzip file ``source`` to ``target``, atomically; an :class:`InputError` naming a damaged one."""
    try:
        with atomic_path(target) as tmp, gzip.open(source, "rb") as f, open(tmp, "wb") as out:
            shutil.copyfileobj(f, out)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip; truncated; corrupt
        raise InputError(f"cannot decompress {source}: it is not a complete gzip file ({type(e).__name__}: {e}); "
                         "restore or replace the file, or remove it from the data.") from e


def write_fov_masks(pairs: list[dict], output: Path) -> None:
    """
    Derive the field of view of every pair's image (:func:`~scripts.data.field_of_view`), write it as a 0/255 PNG
    to ``output/fov/<image stem>_fov.png`` (atomically: never half a file) and add it to the pair as ``fov``.
    Into the output folder, never beside the data: the data may be read-only or shared.
    """
    reader = PILTiffReader(mode="RGB")
    for pair in pairs:
        image, _ = reader.get_data(reader.read(str(pair["image"])))  # an unreadable image: the reader's InputError
        fov = field_of_view(image)  # (W, H): PIL axes
        pair["fov"] = output / "fov" / f"{pair['image'].stem}_fov.png"
        with atomic_path(pair["fov"]) as tmp:
            Image.fromarray(fov.T.astype(np.uint8) * 255).save(tmp, format="PNG")


def split_layout(layout: Layout, pairs: list[dict], seed: int = 0, test_fraction: float = 0.2,
                 val_fraction: float = 0.1, split_file: Path | None = None) -> dict[str, list]:
    """
    :func:`~scripts.data.split_pairs` for ``layout``: the test images named in ``split_file``, else the layout's
    official test images, else a seeded ``test_fraction``; the seeded ``val_fraction`` of the rest validates,
    drawn by subject where the layout knows them (CHASE_DB1: a child's two eyes stay together), else by clip
    (the frames of a video clip stay together).
    """
    test_names = None
    if split_file is not None:
        if not split_file.is_file():
            raise FileNotFoundError(f"split file {split_file} does not exist.")
        test_names = split_file.read_text().splitlines()
    elif layout.is_test is not None:
        test_names = [p["image"].name for p in pairs if layout.is_test(p["image"])]
    group = layout.group or layout.clip
    groups = [group(p["image"]) for p in pairs] if group is not None else None
    return split_pairs(pairs, seed, test_fraction, val_fraction, test_names, groups)


def check_output(output: Path) -> None:
    """Fail at once, before any pair is read, when ``datalist.json`` cannot be written into the folder ``output``."""
    check_output_dir(output, "--output")
    if (output / "datalist.json").is_dir():
        raise InputError(f"{output / 'datalist.json'} is a folder; remove it or pass another --output.")


def make_demo_dataset(output_dir: str | Path, num_images: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """
    Generate a small synthetic polyp-like set: reddish, vignetted mucosa with folds and specular highlights,
    and one to two rounded, textured polyps per frame (some with low contrast, as hard cases), at a few frame
    sizes, as JPEG frames and 0/255 PNG masks in ``output_dir/images`` and ``output_dir/masks``.
    """
    rng = np.random.default_rng(seed)
    images_dir, masks_dir = Path(output_dir) / "images", Path(output_dir) / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    sizes = [(256, 256), (288, 384), (320, 288)]
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = np.hypot((yy - h / 2) / h, (xx - w / 2) / w)
        folds = 0.08 * np.sin(xx / rng.uniform(8, 20) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(10, 25))
        base = np.clip(0.85 - 0.9 * r**2 + folds, 0, 1)
        tint = np.array([0.85, 0.45, 0.40]) * rng.uniform(0.8, 1.1, size=3)
        image = base[..., None] * tint + rng.normal(0, 0.03, (h, w, 3))
        mask = np.zeros((h, w), bool)
        for _ in range(rng.integers(1, 3)):
            cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
            ry, rx = rng.uniform(0.08, 0.22) * h, rng.uniform(0.08, 0.22) * w
            angle = rng.uniform(0, np.pi)
            dy, dx = yy - cy, xx - cx
            u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
            blob = (u / rx) ** 2 + (v / ry) ** 2
            polyp = blob <= 1.0
            contrast = rng.uniform(0.08, 0.35)  # low contrast = hard image
            shade = 1 - 0.4 * np.clip(blob, 0, 1)
            texture = 0.05 * np.sin(xx / 3.0 + yy / 5.0)
            colour = np.array([0.95, 0.55, 0.45]) * (1 + contrast)
            image[polyp] = (shade[..., None] * colour + texture[..., None])[polyp] * (1 - contrast) + image[polyp] * contrast
            mask |= polyp
        for _ in range(rng.integers(1, 4)):  # specular highlights, everywhere
            sy, sx = rng.uniform(0, h), rng.uniform(0, w)
            image[np.hypot(yy - sy, xx - sx) < rng.uniform(2, 6)] = 1.0
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(images_dir / f"demo_{i:03d}.jpg",
                                                                             quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(masks_dir / f"demo_{i:03d}.png")
    return images_dir, masks_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="folder of frames (jpg, png, tif, bmp, gif)")
    source.add_argument("--root", type=Path, help="a data set root with images/masks or Original/Ground Truth, "
                                                  "or DRIVE, CHASE_DB1, STARE or HRF as released")
    source.add_argument("--demo", action="store_true", help="generate the synthetic demo set into OUTPUT")
    parser.add_argument("--masks", type=Path, help="folder of masks, paired with the frames by file stem")
    parser.add_argument("--output", type=Path, required=True, help="where datalist.json is written")
    parser.add_argument("--split-file", type=Path, help="file naming the test images, one per line (replaces the "
                                                        "test images of DRIVE, CHASE_DB1, STARE and HRF)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation(/test) split")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="without --split-file or an official split (default 0.2; 1: all for evaluation)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="of the non-test images (default 0.1)")
    parser.add_argument("--clip-table", type=Path, help="CSV file with the columns frame,clip: each image's file "
                                                        "stem and its video clip (replaces the layout's clips)")
    parser.add_argument("--num-demo", type=int, default=60, help="number of demo images (default 60)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("prepare_data")

    if args.images is not None and args.masks is None:
        parser.error("--images needs --masks")
    try:
        check_output(args.output)
        if args.demo:
            images, masks = make_demo_dataset(args.output, num_images=args.num_demo, seed=args.seed)
            layout = Layout("demo", [{"images_dir": images, "masks_dir": masks}])
        elif args.root is not None:
            layout = find_layout(args.root)
        else:
            layout = Layout("folders", [{"images_dir": args.images, "masks_dir": args.masks}])
        unpacked = 0
        if layout.gzipped:
            layout, unpacked = unpack_gzipped(layout, args.output)
        pairs = [pair for part in layout.parts for pair in find_pairs(**part)]
        if args.clip_table is not None:
            table = read_clip_table(args.clip_table, [p["image"] for p in pairs])
            layout = replace(layout, clip=lambda image: table[image.stem])
        if layout.clip is not None:  # clip by clip, each in natural frame order: the order evaluation scores them in
            for pair in pairs:
                pair["clip"] = layout.clip(pair["image"])
            pairs.sort(key=lambda p: (natural_key(p["clip"]), p["clip"], natural_key(p["image"].name)))
        no_image = [(mask, part["images_dir"]) for part in layout.parts for mask in unpaired_masks(**part)]
        if layout.derive_fov:
            write_fov_masks(pairs, args.output)
        summary = check_pairs(pairs)
        splits = split_layout(layout, pairs, args.seed, args.test_fraction, args.val_fraction, args.split_file)
        folders = lambda key: [str(Path(part[key]).resolve()) for part in layout.parts]  # noqa: E731
        summary.update(
            layout=layout.name, masks_without_image=[str(p) for p, _ in no_image],
            images_dir=folders("images_dir") if len(layout.parts) > 1 else folders("images_dir")[0],
            masks_dir=folders("masks_dir") if len(layout.parts) > 1 else folders("masks_dir")[0], seed=args.seed,
            split_file=str(args.split_file) if args.split_file else None,
            official_split=layout.is_test is not None and layout.split is None and args.split_file is None,
            binarisation=f"max over non-alpha channels; lossless masks with max <= {LABEL_INDEX_MAX}: non-zero; "
                         "otherwise > half of full scale (1, 255 or 65535)",
        )
        if "fov" in pairs[0]:
            summary["fov"] = FOV_RULE if layout.derive_fov else "shipped with the data set"
        if layout.split is not None and args.split_file is None:
            summary["split"] = layout.split
        if layout.clip is not None:
            summary["clips"] = len({p["clip"] for p in pairs})
            summary["clips_from"] = (f"clip table {args.clip_table.resolve()}" if args.clip_table is not None else
                                     f"{layout.name} as released")
        if unpacked:
            summary["unpacked"] = (f"{unpacked} gzip-compressed files of the data set decompressed into "
                                   f"{(args.output / 'unpacked').resolve()}, which the datalist names")
        path = write_datalist(splits, args.output, summary)
    except (OSError, ValueError) as e:  # InputError is a ValueError
        log.error(f"error: {e}")
        return 2
    log.info(f"{path}: {len(splits['training'])} training, {len(splits['validation'])} validation, "
             f"{len(splits['test'])} test pairs; {summary['distinct_sizes']} distinct frame sizes; "
             f"{summary['masks_not_exactly_binary']} masks not exactly binary (binarised), "
             f"{summary['label_index_masks']} of them label-index masks (non-zero = foreground); "
             f"{len(summary['empty_masks'])} empty masks; {len(no_image)} masks without an image (left out)"
             + (f"; {summary['clips']} clips ({summary['clips_from']})" if "clips" in summary else ""))
    if unpacked:
        log.info(summary["unpacked"])
    if "fov" in summary:
        log.info(f"fields of view: {summary['fov']}; {100 * summary['label_outside_fov']:.2f} % of the masks' "
                 "foreground lies outside them")
    for name in summary["empty_masks"]:
        log.warning(f"warning: mask {name} has no foreground pixel (kept: Dice-type losses treat it as empty)")
    for name, images in no_image:
        log.warning(f"warning: mask {name} has no image of the same stem in {images} (left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
