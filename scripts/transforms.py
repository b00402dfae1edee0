# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The input and output ends of inference (``configs/inference.yaml``): which frames of a folder can be read, where
the outputs may go, and the transform that brings the network's output back to each frame's own size.

Inference downsamples a frame with ``area`` interpolation, as training does (box averaging: alias-free, and a
36-megapixel frame takes a fraction of a second), but the probabilities must come back to the frame's size
bilinearly: ``Invertd`` would undo an ``area`` resize with ``area`` (blocky) or nearest. :class:`ResizeToOriginald`
does that one step by hand, from the frame's size as it was loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize

from scripts.data import IMAGE_SUFFIXES, PILTiffReader
from scripts.errors import InputError

__all__ = ["FrameList", "check_output_dir", "original_size", "ResizeToOriginald"]

logger = logging.getLogger(__name__)

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP"}
_SHOWN = 5  # unreadable frames named in a summary; the warnings name every one


def _why_unreadable(path: Path, error: Exception) -> str:
    """A few words on why ``path`` could not be read, e.g. ``truncated JPEG``, ``not an image``."""
    kind = _FORMATS.get(path.suffix.lower(), path.suffix.lstrip(".").upper() or "image")
    error = error.__cause__ or error  # the reader's own error (an InputError of scripts.data) wraps the library's
    text = " ".join(str(error).replace(str(path), path.name).split())
    if path.is_file() and path.stat().st_size == 0:
        return "empty file"
    if "cannot identify image file" in text:
        return f"not a {kind} image"
    if "truncated" in text.lower():  # "image file is truncated", "Truncated File Read"
        return f"truncated {kind}"
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"unreadable {kind}: {type(error).__name__}" + (f": {text}" if text else "")


def _names(failures: list[tuple[Path, str]]) -> str:
    shown = ", ".join(f"{p.name} ({why})" for p, why in failures[:_SHOWN])
    return shown + (f" and {len(failures) - _SHOWN} more (see the warnings above)" if len(failures) > _SHOWN else "")


class FrameList:
    """
    The frames of an inference run: the image files (``IMAGE_SUFFIXES``) directly in ``folder``, sorted, less
    those that cannot be read. :meth:`scan` reads every file once with the bundle's reader as ``LoadImaged``
    does (``read`` and ``get_data``), so "readable" means exactly "inference can load it"; each one that fails
    is named in a warning as it is found and left out, and :meth:`check_all_written`, run after the evaluator,
    ends the run with an :class:`InputError` naming them.

    Why a check up front rather than a dataset that records its failures: the loader runs in worker processes
    (``num_workers``), whose records would have to travel back to the main process, and an item that fails
    cannot simply vanish from a batch (a batch of one would be empty); a list of readable frames keeps MONAI's
    ``Dataset``, ``DataLoader`` and evaluator as they are. The price is one extra decode per frame, measured at
    1.5 ms for a 530×465 JPEG and 0.46 s for a 6000×6000 one (one core), against 0.1-1 s of inference per frame
    on a CPU; the check holds one decoded frame at a time, less memory than inference needs for it.

    Args:
        folder: the folder of frames (``--input_dir``).
        reader: the image reader of ``LoadImaged``; default ``PILTiffReader(mode="RGB")``.
    """

    def __init__(self, folder: str | os.PathLike, reader=None) -> None:
        self.folder = Path(folder)
        self.reader = reader if reader is not None else PILTiffReader(mode="RGB")
        self.files: list[Path] | None = None  # every image file of the folder
        self.readable: list[Path] = []
        self.unreadable: list[tuple[Path, str]] = []  # (file, why)
        self._scanned = False

    def list_files(self) -> list[Path]:
        """The image files of the folder; an :class:`InputError` when the folder is missing or holds none."""
        if self.files is None:
            if not self.folder.is_dir():
                what = "is a file, not a folder" if self.folder.exists() else "does not exist"
                raise InputError(f"input_dir {self.folder} {what}: pass --input_dir the folder that holds the frames.")
            files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise InputError(f"input_dir {self.folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}): pass "
                                 "--input_dir the folder that holds the frames.")
            self.files = files
        return self.files

    def scan(self) -> list[dict[str, str]]:
        """
        Decode every frame once (the first call only) and return the readable ones as the dataset's items,
        ``[{"image": path}, ...]``. An :class:`InputError` when none can be read.
        """
        if not self._scanned:
            self.readable, self.unreadable = [], []
            for path in self.list_files():
                try:
                    self.reader.get_data(self.reader.read(str(path)))  # what LoadImage does: decodes the file
                except MemoryError:
                    raise
                except Exception as e:  # Pillow and tifffile raise many types for corrupt files
                    why = _why_unreadable(path, e)
                    self.unreadable.append((path, why))
                    logger.warning(f"skipping frame {path}: {why}; the other frames are inferred")
                else:
                    self.readable.append(path)
            if not self.readable:
                raise InputError(f"none of the {len(self.files)} image files in input_dir {self.folder} can be "
                                 f"read: {_names(self.unreadable)}; replace them with readable frames.")
            self._scanned = True
        return [{"image": str(p)} for p in self.readable]

    def check_all_written(self, output_dir: str | os.PathLike | None = None) -> bool:
        """After inference: an :class:`InputError` naming the frames that were skipped, if any; else True."""
        if self.unreadable:
            where = f" to {output_dir}" if output_dir is not None else ""
            raise InputError(
                f"inference wrote {len(self.readable)} of {len(self.files)} frames{where}; "
                f"{len(self.unreadable)} could not be read: {_names(self.unreadable)}; fix or remove "
                f"{'it' if len(self.unreadable) == 1 else 'them'} and run again."
            )
        return True


def check_output_dir(path: str | os.PathLike) -> bool:
    """An :class:`InputError` when ``path`` (``--output_dir``), or a folder above it, is an existing file. Creates
    nothing. Returns True, so that a config can run it as an ``initialize`` step."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is an existing file" if folder == path else f"lies under {folder}, which is a file"
                raise InputError(f"output_dir {path} {what}: pass --output_dir a folder (it is created if missing).")
            break
    return True


def original_size(image) -> tuple[int, ...]:
    """The spatial size of ``image`` as it was loaded: ``LoadImage``'s ``spatial_shape`` meta data, (W, H) for
    the PIL readers."""
    meta = getattr(image, "meta", None) or {}
    shape = meta.get("spatial_shape")
    if shape is None:
        raise ValueError("the reference image has no 'spatial_shape' meta data: load it with LoadImage(d).")
    return tuple(int(s) for s in np.asarray(shape).reshape(-1))


class ResizeToOriginald(MapTransform):
    """
    Resize ``keys`` (channel-first, e.g. the network's probabilities) to the size ``ref_key`` had when it was
    loaded, with ``mode`` interpolation: the inverse of inference's downsampling, bilinear whatever mode
    downsampled. The output is a MetaTensor in the frame's own space: the affine is scaled back as ``Invertd``
    would, and the trace of applied operations (the forward resize the output inherited) is cleared.

    Memory: one output tensor, ``C × W × H`` float32 (8 bytes a pixel for the two class probabilities, 20 with
    the three uncertainty maps of MC inference).

    Args:
        keys: the keys to resize.
        ref_key: the key of the loaded image whose ``spatial_shape`` meta data gives the size.
        mode: ``torch.nn.functional.interpolate`` mode; ``bilinear`` for 2-D probabilities.
        align_corners: of the interpolation; False, as ``torch``'s and MONAI's defaults for bilinear.
    """

    def __init__(self, keys: KeysCollection, ref_key: str = "image", mode: str = "bilinear",
                 align_corners: bool | None = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.mode, self.align_corners = ref_key, mode, align_corners

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        size = original_size(d[self.ref_key])
        resize = Resize(spatial_size=size, mode=self.mode, align_corners=self.align_corners, anti_aliasing=False)
        for key in self.key_iterator(d):
            with resize.trace_transform(False):
                out = resize(d[key])
            if isinstance(out, MetaTensor):
                out.applied_operations = []
            d[key] = out
        return d
