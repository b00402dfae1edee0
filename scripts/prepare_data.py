# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Build the bundle's ``datalist.json`` from a folder of images and a folder of masks, or generate the demo set.

    python -m scripts.prepare_data --images DIR --masks DIR --output DIR [--split-file FILE] [--seed N]
    python -m scripts.prepare_data --root Kvasir-SEG --output DIR        # official layouts, found by name
    python -m scripts.prepare_data --demo --output DIR

Images and masks are paired by file stem and every pair is read once, so that a corrupt file, a mask of the
wrong size or an image without a mask stops here, naming the file, instead of in the middle of training.
Masks without an image are left out and listed as warnings. Every failure ends with one line, ``error: ...``,
and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.data import (
    LABEL_INDEX_MAX,
    check_pairs,
    find_pairs,
    split_pairs,
    unpaired_masks,
    write_datalist,
)
from scripts.errors import InputError
from scripts.files import check_output_dir

# (images, masks) sub-folders of the official releases and of this bundle's demo set, tried in order.
KNOWN_LAYOUTS = (("images", "masks"), ("Original", "Ground Truth"), ("original", "ground truth"))


def find_layout(root: Path) -> tuple[Path, Path]:
    """The (images, masks) folders of a data set root laid out as an official release."""
    for images, masks in KNOWN_LAYOUTS:
        if (root / images).is_dir() and (root / masks).is_dir():
            return root / images, root / masks
    expected = " or ".join(f"'{i}' + '{m}'" for i, m in KNOWN_LAYOUTS[:2])
    raise FileNotFoundError(f"{root} holds none of the known layouts ({expected}); pass --images and --masks.")


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
    source.add_argument("--images", type=Path, help="folder of frames (jpg, png, tif, bmp)")
    source.add_argument("--root", type=Path, help="a data set root with images/masks or Original/Ground Truth")
    source.add_argument("--demo", action="store_true", help="generate the synthetic demo set into OUTPUT")
    parser.add_argument("--masks", type=Path, help="folder of masks, paired with the frames by file stem")
    parser.add_argument("--output", type=Path, required=True, help="where datalist.json is written")
    parser.add_argument("--split-file", type=Path, help="file naming the test images, one per line")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/validation(/test) split")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="without --split-file (default 0.2)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="of the non-test images (default 0.1)")
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
        elif args.root is not None:
            images, masks = find_layout(args.root)
        else:
            images, masks = args.images, args.masks
        pairs = find_pairs(images, masks)
        no_image = unpaired_masks(images, masks)
        summary = check_pairs(pairs)
        test_names = None
        if args.split_file is not None:
            if not args.split_file.is_file():
                raise FileNotFoundError(f"split file {args.split_file} does not exist.")
            test_names = args.split_file.read_text().splitlines()
        splits = split_pairs(pairs, args.seed, args.test_fraction, args.val_fraction, test_names)
        summary.update(
            masks_without_image=[str(p) for p in no_image], images_dir=str(Path(images).resolve()),
            masks_dir=str(Path(masks).resolve()), seed=args.seed,
            split_file=str(args.split_file) if args.split_file else None,
            binarisation=f"max over non-alpha channels; lossless masks with max <= {LABEL_INDEX_MAX}: non-zero; "
                         "otherwise > half of full scale (1, 255 or 65535)",
        )
        path = write_datalist(splits, args.output, summary)
    except (OSError, ValueError) as e:  # InputError is a ValueError
        log.error(f"error: {e}")
        return 2
    log.info(f"{path}: {len(splits['training'])} training, {len(splits['validation'])} validation, "
             f"{len(splits['test'])} test pairs; {summary['distinct_sizes']} distinct frame sizes; "
             f"{summary['masks_not_exactly_binary']} masks not exactly binary (binarised), "
             f"{summary['label_index_masks']} of them label-index masks (non-zero = foreground); "
             f"{len(summary['empty_masks'])} empty masks; {len(no_image)} masks without an image (left out)")
    for name in summary["empty_masks"]:
        log.warning(f"warning: mask {name} has no foreground pixel (kept: Dice-type losses treat it as empty)")
    for name in summary["masks_without_image"]:
        log.warning(f"warning: mask {name} has no image of the same stem in {images} (left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
