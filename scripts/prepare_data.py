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
import os
import sys
from pathlib import Path

from scripts.data import (
    LABEL_INDEX_MAX,
    check_pairs,
    find_pairs,
    make_demo_dataset,
    split_pairs,
    unpaired_masks,
    write_datalist,
)
from scripts.errors import InputError

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
    """
    Fail at once, before any pair is read, when ``datalist.json`` cannot be written into the folder ``output``:
    ``output`` is a file, or it (or the folder it would be created in) is not writable.
    """
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file; pass a folder: datalist.json is written into it.")
    if (output / "datalist.json").is_dir():
        raise InputError(f"{output / 'datalist.json'} is a folder; remove it or pass another --output.")
    existing = output
    while not existing.exists() and existing != existing.parent:  # the nearest existing folder: new ones go there
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output {output} cannot be created: {existing} is a file; pass another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output {output} is not writable (no write permission on {existing}); pass another "
                         "folder.")


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
