# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Data: a reader for every format colonoscopy frames come in, the mask binarisation rule, datalist building
and checking, and the synthetic demo set. ``python -m scripts.prepare_data`` is the command line over this.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import MapTransform
from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "PILTiffReader",
    "BinarizeMaskd",
    "binarize_mask",
    "list_images",
    "find_pairs",
    "check_pairs",
    "split_pairs",
    "write_datalist",
    "make_demo_dataset",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
logger = logging.getLogger(__name__)


class PILTiffReader(PILReader):
    """
    MONAI's ``PILReader`` that reads every TIFF through ``tifffile``, so that the TIFFs Pillow cannot open
    (CVC-ClinicDB frames: 3 samples per pixel with MinIsBlack photometry) load too, and image and mask always
    come out in the same PIL axis convention (``(W, H[, C])`` with the default ``reverse_indexing=True``).

    Args:
        mode: a Pillow mode every image is converted to after reading (``"RGB"`` for frames: greyscale is
            replicated, palettes are applied, alpha is dropped), or None to keep the file's own.
        kwargs: passed to ``PILReader``.
    """

    def __init__(self, mode: str | None = None, **kwargs) -> None:
        super().__init__(converter=(lambda im: im.convert(mode)) if mode else None, **kwargs)
        self.mode = mode

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = [str(f).lower() for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
        return all(n.endswith(IMAGE_SUFFIXES) for n in names)

    def read(self, data, **kwargs):
        names = data if isinstance(data, (list, tuple)) else [data]
        if not any(str(n).lower().endswith((".tif", ".tiff")) for n in names):
            return super().read(data, **kwargs)
        images = [self._read_tiff(n) for n in names]
        return images if len(images) > 1 else images[0]

    def _read_tiff(self, name) -> Image.Image:
        array = tifffile.imread(name)
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)  # planar configuration
        if array.dtype == np.uint16 and array.ndim == 3:  # Pillow has no 16-bit colour mode: keep the top byte
            array = (array >> 8).astype(np.uint8)
        if array.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"{name}: unsupported TIFF sample type {array.dtype} (expected 8- or 16-bit integers).")
        image = Image.fromarray(array)  # 16-bit greyscale stays 16-bit (mode I;16): masks keep their full scale
        return self.converter(image) if callable(self.converter) else image


def binarize_mask(mask: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """
    The binarisation rule for ground-truth masks, shape ``(C, *spatial)`` -> ``(1, *spatial)`` of 0/1 floats.

    A trailing alpha channel (C = 2 or 4) is ignored and the other channels are reduced by their maximum,
    so a coloured mask counts wherever any colour is lit. The mask's full scale is 1 if its maximum is at
    most 1 (MONAI Label's 0/1 masks), 255 if at most 255 (the public sets' 0/255 JPEGs and TIFFs) and
    65535 otherwise; a pixel is foreground when its value is above half the full scale. JPEG artefacts
    (Kvasir-SEG has ~47 grey levels) therefore fall on the right side, and an empty mask stays empty
    (a threshold relative to the mask's own maximum would turn JPEG noise into foreground).
    """
    if mask.ndim < 3:
        raise ValueError(f"mask must be channel-first (C, *spatial), got shape {tuple(mask.shape)}.")
    if mask.shape[0] in (2, 4):
        mask = mask[:-1]
    grey = mask.max(0, keepdims=True) if isinstance(mask, np.ndarray) else mask.amax(0, keepdim=True)
    peak = float(grey.max())
    full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
    binary = grey > full_scale / 2
    return binary.astype(np.float32) if isinstance(binary, np.ndarray) else binary.to(torch.float32)


class BinarizeMaskd(MapTransform):
    """
    Dictionary transform that applies :func:`binarize_mask` to ``keys`` and, when ``ref_key`` is given, first
    checks that each mask has the spatial size of its image, naming both files when it does not (resizing
    would otherwise hide a mismatched pair).
    """

    def __init__(self, keys: KeysCollection, ref_key: str | None = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if self.ref_key is not None and tuple(mask.shape[1:]) != tuple(d[self.ref_key].shape[1:]):
                raise ValueError(
                    f"mask {_source(mask)} has spatial size {tuple(mask.shape[1:])} but its image "
                    f"{_source(d[self.ref_key])} has {tuple(d[self.ref_key].shape[1:])}."
                )
            d[key] = binarize_mask(mask)
        return d


def _source(x) -> str:
    meta = getattr(x, "meta", {})
    return str(meta.get("filename_or_obj", "<in memory>"))


def list_images(folder: str | Path, what: str = "images") -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``, any case) directly in ``folder``, sorted; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist or is not a folder.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{what} folder {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}).")
    return files


def _stem_index(folder: Path, what: str) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in list_images(folder, what):
        if path.stem in index:
            raise ValueError(f"{what} folder {folder} holds two files with the stem {path.stem!r}: "
                             f"{index[path.stem].name} and {path.name}; images and masks are paired by stem.")
        index[path.stem] = path
    return index


def find_pairs(images_dir: str | Path, masks_dir: str | Path) -> list[dict[str, Path]]:
    """Pair every image in ``images_dir`` with the mask of the same file stem in ``masks_dir``."""
    images = _stem_index(Path(images_dir), "images")
    masks = _stem_index(Path(masks_dir), "masks")
    orphans = sorted(set(images) - set(masks))
    if orphans:
        shown = ", ".join(images[s].name for s in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        raise ValueError(f"{len(orphans)} image(s) in {images_dir} have no mask of the same stem in {masks_dir}: "
                         f"{shown}")
    return [{"image": images[s], "label": masks[s]} for s in sorted(images)]


def check_pairs(pairs: Sequence[Mapping[str, Path]], progress: bool = True) -> dict:
    """
    Read every pair the way training will and fail on the first bad one, naming the file: unreadable or
    corrupt image or mask, or a mask whose size differs from its image. Returns a summary: masks with no
    foreground (allowed, listed) and masks that were not exactly binary (binarised by :func:`binarize_mask`).
    """
    image_reader, mask_reader = PILTiffReader(mode="RGB"), PILTiffReader()
    empty, not_binary, sizes = [], 0, set()
    iterator = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="checking pairs", unit="pair", disable=None)  # None: off when not a TTY
    for pair in iterator:
        image = _read(image_reader, pair["image"], "image")
        mask = _read(mask_reader, pair["label"], "mask")
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"mask {pair['label']} is {mask.shape[1]}×{mask.shape[0]} (H×W) but its image "
                             f"{pair['image']} is {image.shape[1]}×{image.shape[0]}.")
        mask = mask[None] if mask.ndim == 2 else np.moveaxis(mask, -1, 0)
        binary = binarize_mask(mask)
        if not binary.any():
            empty.append(str(pair["label"]))
        if not np.isin(np.unique(mask), (0, 1, 255)).all():
            not_binary += 1
        sizes.add(image.shape[:2])
    return {"pairs": len(pairs), "empty_masks": empty, "masks_not_exactly_binary": not_binary,
            "distinct_sizes": len(sizes)}


def _read(reader: PILTiffReader, path: Path, what: str) -> np.ndarray:
    try:
        array, _ = reader.get_data(reader.read(str(path)))
    except Exception as e:  # Pillow and tifffile raise many types for corrupt files
        raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
    return np.asarray(array)


def split_pairs(
    pairs: Sequence[Mapping[str, Path]],
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    test_names: Sequence[str] | None = None,
) -> dict[str, list]:
    """
    Split into ``training``, ``validation`` and ``test``: the thesis's seeded 8:2 train/test split with 10% of
    train held out for validation, or, with ``test_names`` (file names or stems, e.g. PraNet's 100 Kvasir-SEG
    test images), exactly those as test and the seeded validation fraction from the rest.
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    rng = np.random.default_rng(seed)
    pairs = list(pairs)
    if test_names is not None:
        wanted = {Path(n.strip()).stem for n in test_names if n.strip()}
        known = {p["image"].stem for p in pairs}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"{len(missing)} test name(s) of the split file are not among the images: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        test = [p for p in pairs if p["image"].stem in wanted]
        rest = [p for p in pairs if p["image"].stem not in wanted]
    else:
        order = rng.permutation(len(pairs))
        n_test = int(round(test_fraction * len(pairs)))
        test = [pairs[i] for i in sorted(order[:n_test])]
        rest = [pairs[i] for i in sorted(order[n_test:])]
    order = rng.permutation(len(rest))
    n_val = int(round(val_fraction * len(rest)))
    return {
        "training": [rest[i] for i in sorted(order[n_val:])],
        "validation": [rest[i] for i in sorted(order[:n_val])],
        "test": test,
    }


def write_datalist(splits: Mapping[str, Sequence[Mapping[str, Path]]], output_dir: str | Path, summary: dict) -> Path:
    """Write ``datalist.json``: paths relative to ``output_dir`` (the bundle's ``dataset_dir``) and the summary."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(Path(p).resolve(), output_dir.resolve())  # noqa: E731
    datalist = {k: [{"image": rel(p["image"]), "label": rel(p["label"])} for p in v] for k, v in splits.items()}
    datalist["summary"] = {**summary, **{f"num_{k}": len(v) for k, v in splits.items()}}
    path = output_dir / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n")
    return path


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
