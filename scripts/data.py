# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Data at run time: a reader for every format colonoscopy frames come in, the mask binarisation rule, the checked
datalist and frame list, and datalist building. ``python -m scripts.prepare_data`` (which also makes the synthetic
demo set) is the command line over this.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import tifffile
import torch
from monai.config import KeysCollection
from monai.data import PILReader
from monai.transforms import MapTransform
from monai.utils import ensure_tuple
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from scripts.errors import InputError, check_int
from scripts.files import atomic_write
from scripts.video import VIDEO_SUFFIXES, VideoDecoder, VideoFrame, output_name

__all__ = [
    "IMAGE_SUFFIXES",
    "LOSSY_SUFFIXES",
    "LABEL_INDEX_MAX",
    "MASK_KEYS",
    "FOV_LEVEL",
    "PILTiffReader",
    "check_patch_size",
    "BinarizeMaskd",
    "binarize_mask",
    "is_lossless",
    "field_of_view",
    "list_images",
    "FrameList",
    "find_pairs",
    "unpaired_masks",
    "check_pairs",
    "load_datalist",
    "split_pairs",
    "write_datalist",
    "spatial_size",
    "natural_key",
    "TEXT_KEYS",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".ppm")  # .gif: DRIVE; .ppm: STARE
TIFF_SUFFIXES = (".tif", ".tiff")
LOSSY_SUFFIXES = (".jpg", ".jpeg")  # masks in these files may carry compression noise: see binarize_mask
LABEL_INDEX_MAX = 127  # a lossless mask whose maximum is at most this holds label indices: see binarize_mask
# the datalist keys that name a mask of the image, read, checked and binarised alike, and what a message calls them:
# the ground truth, a field of view (fundus sets: where metrics are counted) and a second observer's annotation
MASK_KEYS = {"label": "mask", "fov": "field-of-view mask", "label_2nd": "second observer's mask"}
# datalist keys that hold names, not files: written and loaded as plain strings, never joined to the datalist's
# folder (a clip named like a folder beside the datalist stays a name). ``clip``: the video clip a frame belongs to
TEXT_KEYS = ("clip",)
FOV_LEVEL = 15  # field_of_view: the brightest channel (0-255) above which a fundus pixel is inside the field of view
# EXIF orientations that swap width and height (transpose, 90° and 270° rotations)
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
logger = logging.getLogger(__name__)


class PILTiffReader(PILReader):
    """
    MONAI's ``PILReader`` for colonoscopy frames and masks. Image and mask must both be read with it, so that
    they come out in the same PIL axis convention (``(W, H[, C])`` with the default ``reverse_indexing=True``)
    and the same orientation.

    - Every TIFF is read through ``tifffile``, so that the TIFFs Pillow cannot open (CVC-ClinicDB frames:
      3 samples per pixel with MinIsBlack photometry) load too.
    - Every other file is turned as its EXIF Orientation tag says (``PIL.ImageOps.exif_transpose``), that is
      the way image viewers show it: a frame stored unrotated with an Orientation tag and a mask drawn over
      the frame as shown then line up. (TIFF orientation tags are not applied; the public sets have none.)
    - A palette image whose used colours are all grey (GIF masks such as DRIVE's, which Pillow opens as
      palette images) is read as the grey levels a viewer shows, not as palette indices, which depend on the
      writer: a 0/255 mask stored with white as index 0 would otherwise come out inverted. Coloured palettes
      keep their indices (label-index masks drawn with a colour per class).
    - A frame decoded from a video (:class:`scripts.video.VideoFrame`, which ``LoadImaged(expanduser=False)``
      passes on as it is) is read as an image of its pixels, named as the frame.
    - A file that is missing, truncated, corrupt or not an image ends in an
      :class:`~scripts.errors.InputError` that names it and says why. ``LoadImage`` catches every exception of
      a given reader's ``read`` and goes on to try its default readers, ending in a misleading "cannot find a
      suitable reader ... install the reader libraries" with the first error dropped; so ``read`` decodes the
      file at once and keeps a failure for ``get_data``, whose exceptions ``LoadImage`` lets through.

    Args:
        mode: a Pillow mode every image is converted to after reading (``"RGB"`` for frames: greyscale is
            replicated, palettes are applied, alpha is dropped), or None to keep the file's own.
        kwargs: passed to ``PILReader`` (and from there to ``PIL.Image.open``).
    """

    def __init__(self, mode: str | None = None, **kwargs) -> None:
        super().__init__(converter=(lambda im: im.convert(mode)) if mode else None, **kwargs)
        self.mode = mode

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        names = [str(f).lower() for f in (filename if isinstance(filename, (list, tuple)) else [filename])]
        return all(n.endswith(IMAGE_SUFFIXES) for n in names)

    def read(self, data, **kwargs):
        """
        Read and decode ``data`` (a file name or a list of them, stacked as channels by ``get_data``): a PIL image
        per file, or, for a file that cannot be read, a record of why that ``get_data`` raises.
        """
        images = [self._open(name, **kwargs) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        """``PILReader.get_data``, after raising the :class:`InputError` of the first file ``read`` could not read."""
        for image in ensure_tuple(img):
            if isinstance(image, _Unreadable):
                raise _cannot_read(image.name, image.error) from image.error
        return super().get_data(img)

    def _open(self, name, **kwargs) -> Image.Image | _Unreadable:
        try:
            if isinstance(name, VideoFrame):  # decoded already, by the frame stream (LoadImaged expanduser=False)
                image = name.to_image()
            elif str(name).lower().endswith(TIFF_SUFFIXES):
                image = self._read_tiff(name)
            else:
                image = Image.open(name, **{**self.kwargs, **kwargs})
                image.load()  # decode now: a truncated file must fail here, where the file is known
                ImageOps.exif_transpose(image, in_place=True)
                if image.mode == "P" and _grey_palette(image):
                    image = image.convert("L")
            return self.converter(image) if callable(self.converter) else image
        except Exception as e:  # Pillow and tifffile raise many types for missing, truncated and foreign files
            return _Unreadable(str(name), e)

    @staticmethod
    def _read_tiff(name) -> Image.Image:
        array = tifffile.imread(name)
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = np.moveaxis(array, 0, -1)  # planar configuration
        if array.dtype == np.uint16 and array.ndim == 3:  # Pillow has no 16-bit colour mode: keep the top byte
            array = (array >> 8).astype(np.uint8)
        if array.dtype not in (np.uint8, np.uint16):
            raise TypeError(f"unsupported TIFF sample type {array.dtype} (expected 8- or 16-bit integers)")
        return Image.fromarray(array)  # 16-bit greyscale stays 16-bit (mode I;16): masks keep their full scale


def _grey_palette(image: Image.Image) -> bool:
    """Whether every colour of ``image``'s palette that its pixels use is a grey (R = G = B)."""
    palette = np.asarray(image.getpalette() or [], np.int32).reshape(-1, 3)
    used = np.unique(np.asarray(image))
    return bool(used.max() < len(palette)) and bool((palette[used] == palette[used, :1]).all())


class _Unreadable:
    """A file :meth:`PILTiffReader.read` could not read, and the exception why, for ``get_data`` to report."""

    def __init__(self, name: str, error: Exception) -> None:
        self.name, self.error = name, error


# why a file could not be read, by the exception Pillow or tifffile raised: (types, a few words, the sentence's reason)
_UNREADABLE = (
    (FileNotFoundError, "missing", "it does not exist"),
    (IsADirectoryError, "a folder", "it is a folder"),
    (PermissionError, "permission denied", "permission to read it is denied"),
    ((UnidentifiedImageError, tifffile.TiffFileError), "not a {kind} image",
     "it is not an image file that Pillow or tifffile can read (is the file complete and its suffix right?)"),
    ((OSError, SyntaxError, EOFError), "truncated or corrupt {kind}",  # "image file is truncated", "broken PNG"
     "it is truncated or corrupt ({name}: {error})"),
)


# tifffile decodes most TIFF compressions (LZW: DRIVE's frames; JPEG, PackBits) through the package imagecodecs, and
# without it fails on a sound file with, e.g., ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")
_MISSING_PACKAGE = re.compile(r"(?P<feature>.*) requires the '(?P<package>[\w.-]+)' package")
_TIFF_ENUM = re.compile(r"<(?P<enum>[A-Z]+)\.(?P<value>\w+): \d+>")  # <COMPRESSION.LZW: 5> -> "LZW compression"


def _missing_package(error: Exception) -> tuple[str, str] | None:
    """
    ``(feature, package)`` when ``error`` says that decoding a file needs a package that is not installed (the file
    is then sound: installing the package is the remedy), e.g. ``("LZW compression", "imagecodecs")``; else None.
    """
    match = _MISSING_PACKAGE.fullmatch(str(error).strip("'\""))
    if match is None:
        return None
    feature = _TIFF_ENUM.sub(lambda m: f"{m['value']} {m['enum'].lower()}", match["feature"])
    return feature, match["package"]


def _unreadable_reason(error: Exception, short: bool = False, kind: str = "image") -> str:
    """Why a file could not be read: a few words (``short``, e.g. ``truncated or corrupt JPEG``) or the reason
    of :func:`_cannot_read`'s sentence."""
    missing = _missing_package(error)
    if missing is not None:
        feature, package = missing
        return (f"{feature} needs `pip install {package}`" if short else
                f"its {feature} needs the Python package {package}, which is not installed")
    for types, words, reason in _UNREADABLE:
        if isinstance(error, types):
            return (words if short else reason).format(kind=kind, name=type(error).__name__, error=error)
    return f"{type(error).__name__}: {error}"


def _cannot_read(path, error: Exception, datalist=None) -> InputError:
    """
    The one-sentence error for an image file that cannot be opened or decoded, naming it (and its datalist): what
    to install when a decoder is missing, else how to replace a damaged file.
    """
    where = f" named in datalist {datalist}" if datalist is not None else ""
    missing = _missing_package(error)
    remedy = (f"run `pip install {missing[1]}` and try again" if missing is not None else
              "restore or replace the file, or remove it from the data")
    return InputError(f"cannot read image file {path}{where}: {_unreadable_reason(error)}; {remedy}.")


def _header_size(path) -> tuple[int, int]:
    """
    ``(width, height)`` of an image file as :class:`PILTiffReader` loads it (EXIF orientation applied to every
    non-TIFF), from the file's header alone; raises what Pillow or tifffile raise for a file they cannot open.
    """
    if str(path).lower().endswith(TIFF_SUFFIXES):
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return int(page.imagewidth), int(page.imagelength)
    with Image.open(path) as image:
        width, height = image.size
        # Image.getexif, not PngImageFile.getexif: that one decodes the whole file to look for EXIF after the pixels
        orientation = Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in SWAPPING_ORIENTATIONS else (width, height)


def check_patch_size(items: Sequence[Mapping], patch_size, multiple: int = 16) -> Sequence[Mapping]:
    """
    ``items`` (datalist entries) unchanged if ``patch_size`` is an integer multiple of ``multiple`` (the U-Net pools
    four times) that fits inside every entry's image, read from the files' headers; otherwise an
    :class:`InputError` naming ``--patch_size`` and the first image it does not fit.
    """
    check_int(patch_size, "--patch_size", multiple)
    if patch_size % multiple:
        raise InputError(f"--patch_size must be a multiple of {multiple} (the U-Net pools four times), got {patch_size}.")
    for item in items:
        w, h = _header_size(item["image"])
        if min(w, h) < patch_size:
            raise InputError(f"--patch_size {patch_size} is larger than training image {item['image']} ({h}×{w}, "
                             f"H×W): every patch is cut from inside one image; pass --patch_size "
                             f"{min(w, h) // multiple * multiple} or less.")
    return items


def spatial_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """
    The network input size in the readers' axis order: ``image_size`` is one integer (square) or ``[H, W]`` as
    people write it (CVC-ClinicDB: ``[288, 384]``); the PIL readers load arrays as ``(C, W, H)``, so the
    spatial size of ``Resized`` is ``(W, H)``.
    """
    if isinstance(image_size, (list, tuple)):
        height, width = image_size
        return int(width), int(height)
    return int(image_size), int(image_size)


def binarize_mask(mask: np.ndarray | torch.Tensor, *, lossless: bool = False) -> np.ndarray | torch.Tensor:
    """
    The binarisation rule for ground-truth masks, shape ``(C, *spatial)`` -> ``(1, *spatial)`` of 0/1 floats.

    A trailing alpha channel (C = 2 or 4) is ignored and the other channels are reduced by their maximum,
    so a coloured mask counts wherever any colour is lit. Then:

    - Label-index masks: a mask stored losslessly (``lossless=True``: any file but ``.jpg``/``.jpeg``) whose
      maximum is at most ``LABEL_INDEX_MAX`` (127) holds label indices (0 background; 1, 2, ... polyps or
      classes) or is a 0/1 mask: every non-zero pixel is foreground. (The rule below would make a 0/1/2
      mask empty.)
    - Otherwise, and always for JPEG masks and plain arrays (``lossless=False``): the mask's full scale is 1
      if its maximum is at most 1 (MONAI Label's 0/1 masks), 255 if at most 255 (the public sets' 0/255 JPEGs
      and TIFFs) and 65535 otherwise; a pixel is foreground when its value is above half the full scale. JPEG
      artefacts (Kvasir-SEG has ~47 grey levels) therefore fall on the right side, and an empty JPEG mask
      stays empty (a threshold at zero, or relative to the mask's own maximum, would turn its noise into
      foreground).

    Args:
        mask: channel-first mask, numpy or torch.
        lossless: whether the mask was read from a lossless file; :class:`BinarizeMaskd` and
            :func:`check_pairs` set it from the file name (:func:`is_lossless`).
    """
    grey = _grey(mask)
    peak = float(grey.max())
    if _is_label_index(peak, lossless):
        binary = grey > 0
    else:
        full_scale = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0
        binary = grey > full_scale / 2
    return binary.astype(np.float32) if isinstance(binary, np.ndarray) else binary.to(torch.float32)


def is_lossless(filename: str | os.PathLike | None) -> bool:
    """Whether a mask file keeps its values exactly (any suffix but ``LOSSY_SUFFIXES``); False for no file."""
    return filename is not None and Path(str(filename)).suffix.lower() not in LOSSY_SUFFIXES


def _is_label_index(peak: float, lossless: bool) -> bool:
    return lossless and peak <= LABEL_INDEX_MAX


def _grey(mask: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The channel-first mask reduced to one channel: the maximum over its channels but a trailing alpha."""
    if mask.ndim < 3:
        raise ValueError(f"mask must be channel-first (C, *spatial), got shape {tuple(mask.shape)}.")
    if mask.shape[0] in (2, 4):
        mask = mask[:-1]
    return mask.max(0, keepdims=True) if isinstance(mask, np.ndarray) else mask.amax(0, keepdim=True)


def field_of_view(image: np.ndarray, level: int = FOV_LEVEL) -> np.ndarray:
    """
    The field of view of a fundus photograph, for sets that ship none (CHASE_DB1): a boolean mask of the
    bright disc in its dark surround. ``image``: 8-bit, channels last (either axis order; PIL's ``(W, H, C)``
    comes back ``(W, H)``).

    The rule: pixels whose brightest channel is above ``level``; of them, the largest connected component (JPEG
    specks in the surround reach 24); its holes filled (dark vessels and lesions in the disc reach down to 20).
    No erosion: the annotators' vessel strokes already run a few pixels past the disc's edge. Measured on all 28
    CHASE_DB1 images: 99.9 % of the surround (more than 5 px from the disc) is at most 10, 99.9 % of the disc
    (more than 5 px from its edge) at least 25, so ``level = 15`` lies in the gap; the disc edge is sharp (the
    covered fraction moves by 0.3 % of the frame between levels 10 and 25). It gives one disc per image,
    65.3-69.7 % of the frame, solidity >= 0.996, eccentricity <= 0.11, mean grey level >= 54 inside and <= 0.2
    outside; 0.11 % of the first observer's vessel pixels fall outside it (mean over images; at most 0.42 %,
    Image_06L), none more than 12 px from its edge.
    """
    from scipy import ndimage

    bright = np.asarray(image).max(axis=-1) > level
    components, count = ndimage.label(bright)
    if count == 0:
        return bright
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(components == sizes.argmax())


class BinarizeMaskd(MapTransform):
    """
    Dictionary transform that applies :func:`binarize_mask` to ``keys`` and, when ``ref_key`` is given, first
    checks that each mask has the spatial size of its image, naming both files when it does not (resizing
    would otherwise hide a mismatched pair). Whether a mask is lossless (its label-index rule) follows from
    the file it was read from, ``mask.meta["filename_or_obj"]``; a mask with no file name takes the JPEG-safe
    full-scale rule.
    """

    def __init__(self, keys: KeysCollection, ref_key: str | None = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = d[key]
            if self.ref_key is not None and tuple(mask.shape[1:]) != tuple(d[self.ref_key].shape[1:]):
                # the readers' arrays are (C, W, H): the sizes are already (width, height)
                raise _size_mismatch(_source(d[self.ref_key]), _source(mask), d[self.ref_key].shape[1:],
                                     mask.shape[1:])
            d[key] = binarize_mask(mask, lossless=is_lossless(_filename(mask)))
        return d


def _filename(x) -> str | None:
    name = getattr(x, "meta", {}).get("filename_or_obj")
    return None if name is None else str(name)


def _source(x) -> str:
    name = _filename(x)
    return "<in memory>" if name is None else name


def natural_key(path: str | os.PathLike) -> list:
    """
    The sort key of a frame's file name in natural order: digit runs compare as numbers, so ``2.jpg`` comes before
    ``10.jpg`` (and ``case1_2`` before ``case1_10``); the rest compares case-insensitively.
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower())
            for part in re.split(r"(\d+)", Path(path).name) if part]


def _check_folder(folder: Path, what: str, hint: str) -> None:
    """An :class:`InputError` naming ``what`` when ``folder`` is missing or a file; ``hint``: ": what to do"."""
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise InputError(f"{what} {folder} {state}{hint}.")


def list_images(folder: str | Path, what: str = "images", hint: str = "", key=None) -> list[Path]:
    """
    The image files (``IMAGE_SUFFIXES``, any case) directly in ``folder``, sorted (by ``key``; default: by path).
    An :class:`InputError` naming ``what`` (the option that gave the folder) when it is missing, a file, or holds
    no image; ``hint`` says what to do.
    """
    folder = Path(folder)
    hint = f": {hint}" if hint else ""
    _check_folder(folder, what, hint)
    files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=key)
    if not files:
        raise InputError(f"{what} {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}){hint}.")
    return files


_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP",
            ".ppm": "PPM"}
_SHOWN = 5  # unreadable frames named in a summary; the warnings name every one


def _why_unreadable(path: Path, error: Exception) -> str:
    """A few words on why frame ``path`` could not be read, e.g. ``truncated or corrupt JPEG``, ``empty file``."""
    if path.is_file() and path.stat().st_size == 0:
        return "empty file"
    kind = _FORMATS.get(path.suffix.lower(), path.suffix.lstrip(".").upper() or "image")
    return _unreadable_reason(error.__cause__ or error, short=True, kind=kind)  # the reader's InputError wraps it


def _names(failures: list[tuple[Path, str]]) -> str:
    shown = ", ".join(f"{p.name} ({why})" for p, why in failures[:_SHOWN])
    return shown + (f" and {len(failures) - _SHOWN} more (see the warnings above)" if len(failures) > _SHOWN else "")


class FrameList:
    """
    The inputs of an inference run, checked before any work: the still images (``IMAGE_SUFFIXES``), video files
    (``scripts.video.VIDEO_SUFFIXES``) and frame folders (sub-folders holding images, e.g. SUN-SEG's
    ``Frame/<clip>/``) directly in ``folder``, or the one file or frame folder ``path``, in natural order
    (:func:`natural_key`: ``2.jpg`` before ``10.jpg``). :meth:`scan` reads every still image and every frame of a
    frame folder once with the bundle's reader as ``LoadImaged`` does (``read`` and ``get_data``), so "readable"
    means exactly "inference can load it", and opens every video and decodes its first frame. What fails is named
    in a warning as it is found and left out: a still image or a folder's frame that cannot be read, a folder whose
    frames differ in size (an overlay video has one size), a video that cannot be opened, holds no video stream or
    no frame. :meth:`check_all_written`, run after the evaluator, ends the run with an :class:`InputError` naming
    them, and the videos whose decoding lost packets on the way (``damaged``, filled by
    :class:`scripts.video.VideoReport`).

    Why a check up front rather than a dataset that records its failures: the loader runs in worker processes
    (``num_workers``), whose records would have to travel back to the main process, and an item that fails
    cannot simply vanish from a batch (a batch of one would be empty); a list of readable inputs keeps MONAI's
    ``DataLoader`` and evaluator as they are. The price is one extra decode per still frame, measured at
    1.5 ms for a 530×465 JPEG and 0.46 s for a 6000×6000 one (one core), against 0.1-1 s of inference per frame
    on a CPU; a video costs one frame here, whatever its length.

    Args:
        folder: the folder of inputs (``--input_dir``).
        reader: the image reader of ``LoadImaged``; default ``PILTiffReader(mode="RGB")``.
        path: one image, video file or frame folder (``--input``) instead of ``folder``'s contents.
        output_dir: the run's output folder: left out when it lies in ``folder`` (an earlier run's masks are not
            a frame folder).
    """

    def __init__(self, folder: str | os.PathLike, reader=None, path: str | os.PathLike | None = None,
                 output_dir: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder)
        self.path = None if path is None else Path(path)
        self.output_dir = None if output_dir is None else Path(output_dir).resolve()
        self.reader = reader if reader is not None else PILTiffReader(mode="RGB")
        self.kinds: dict[Path, str] | None = None  # every input found, in natural order: image, frames or video
        self.inputs: list[dict] = []
        self.unreadable: list[tuple[Path, str]] = []  # (input or frame, why) left out
        self.damaged: list[tuple[Path, str]] = []  # (video, what was lost) written in part
        self._scanned = False

    @property
    def root(self) -> str:
        """The folder the outputs' names are relative to (``SaveImaged``'s ``data_root_dir``)."""
        return str((self.path.parent if self.path is not None else self.folder).resolve())

    @staticmethod
    def _kind(path: Path) -> str | None:
        if path.is_dir():
            return "frames" if any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.iterdir() if f.is_file()) \
                else None
        suffix = path.suffix.lower()
        return "image" if suffix in IMAGE_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None

    @property
    def files(self) -> list[Path] | None:
        """Every input found (:meth:`list_files`), None before."""
        return None if self.kinds is None else list(self.kinds)

    def list_files(self) -> list[Path]:
        """The inputs; an :class:`InputError` when the folder (or ``path``) is missing or holds none."""
        if self.kinds is None:
            if self.path is not None:
                if not self.path.exists():
                    raise InputError(f"input {self.path} does not exist.")
                kind = self._kind(self.path)
                if kind is None:
                    raise InputError(f"input {self.path} is not an image ({', '.join(IMAGE_SUFFIXES)}), a video "
                                     f"({', '.join(VIDEO_SUFFIXES)}) or a folder of frames.")
                kinds = {self.path: kind}
            else:
                hint = ": pass --input_dir the folder that holds the frames, videos or frame folders"
                _check_folder(self.folder, "input_dir", hint)
                found = ((p, self._kind(p)) for p in self.folder.iterdir()
                         if not p.name.startswith(".") and p.resolve() != self.output_dir)
                kinds = {p: kind for p, kind in sorted(found, key=lambda pk: natural_key(pk[0])) if kind is not None}
                if not kinds:
                    raise InputError(f"input_dir {self.folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}), "
                                     f"video file ({', '.join(VIDEO_SUFFIXES)}) or folder of frames{hint}.")
            self._check_names(kinds)
            self.kinds = kinds
        return self.files

    @property
    def _stills_only(self) -> bool:
        return all(kind == "image" for kind in self.kinds.values())

    @staticmethod
    def _check_names(kinds: Mapping[Path, str]) -> None:
        """Videos and frame folders write into ``output_dir/<stem>/``: two of one stem would mix their outputs."""
        seen: dict[str, Path] = {}
        for path, kind in kinds.items():
            if kind != "image":
                name = output_name(path, kind)
                if name in seen:
                    raise InputError(f"{seen[name]} and {path} would both write their outputs to <output_dir>/"
                                     f"{name}/; rename one of them.")
                seen[name] = path

    def _readable(self, path: Path) -> tuple[int, ...] | None:
        """The frame's (W, H) when the reader can load it, else None after a warning and a record."""
        try:
            array, _ = self.reader.get_data(self.reader.read(str(path)))  # what LoadImage does: decodes the file
        except MemoryError:
            raise
        except Exception as e:  # Pillow and tifffile raise many types for corrupt files
            why = _why_unreadable(path, e)
            self.unreadable.append((path, why))
            logger.warning(f"skipping frame {path}: {why}; the other frames are inferred")
            return None
        return tuple(array.shape[:2])

    def _scan_folder(self, folder: Path) -> dict | None:
        frames, sizes = [], {}
        for path in list_images(folder, "frame folder", key=natural_key):
            size = self._readable(path)
            if size is not None:
                frames.append(path)
                sizes.setdefault(size, path)
        if len(sizes) > 1:
            (first, a), (other, b) = list(sizes.items())[:2]
            why = (f"its frames differ in size: {b.name} is {other[0]}x{other[1]}, {a.name} {first[0]}x{first[1]} "
                   "(one clip, one size: an overlay video has one)")
            self.unreadable.append((folder, why))
            logger.warning(f"skipping frame folder {folder}: {why}; the other inputs are inferred")
            return None
        return {"kind": "frames", "source": str(folder), "frames": [str(p) for p in frames]} if frames else None

    def _scan_video(self, path: Path) -> dict | None:
        try:
            VideoDecoder(path).probe()
        except InputError as e:
            why = str(e).rstrip(".")
            self.unreadable.append((path, why))
            logger.warning(f"skipping video: {why}; the other inputs are inferred")
            return None
        return {"kind": "video", "source": str(path)}

    def scan(self) -> list[dict]:
        """
        Check every input once (the first call only) and return the readable ones as ``FrameStream``'s inputs:
        ``{"kind": "image", "image": path}``, ``{"kind": "frames", "source": folder, "frames": [path, ...]}`` or
        ``{"kind": "video", "source": path}``. An :class:`InputError` when none can be read.
        """
        if not self._scanned:
            self.inputs, self.unreadable = [], []
            self.list_files()
            for path, kind in self.kinds.items():
                if kind == "image":
                    entry = {"kind": "image", "image": str(path)} if self._readable(path) is not None else None
                else:
                    entry = self._scan_folder(path) if kind == "frames" else self._scan_video(path)
                if entry is not None:
                    self.inputs.append(entry)
            if not self.inputs:
                what = "image files" if self._stills_only else "inputs"
                raise InputError(f"none of the {len(self.kinds)} {what} in {self.path or self.folder} can be "
                                 f"read: {_names(self.unreadable)}; replace them with readable ones.")
            self._scanned = True
        return self.inputs

    def check_all_written(self, output_dir: str | os.PathLike | None = None) -> bool:
        """After inference: an :class:`InputError` naming what was skipped or decoded in part, if any; else True."""
        if not (self.unreadable or self.damaged):
            return True
        where = f" to {output_dir}" if output_dir is not None else ""
        what = "frames" if self._stills_only else "inputs"
        parts = [f"{len(failed)} {how}: {_names(failed)}"
                 for failed, how in ((self.unreadable, "could not be read"), (self.damaged, "decoded in part"))
                 if failed]
        them = "it" if len(self.unreadable) + len(self.damaged) == 1 else "them"
        raise InputError(f"inference wrote {len(self.inputs)} of {len(self.kinds)} {what}{where}; "
                         f"{'; '.join(parts)}; fix or remove {them} and run again.")


def _stem_index(folder: Path, what: str, name: str = "{id}", id_pattern: str = ".+") -> dict[str, Path]:
    """
    The image files of ``folder`` whose stem fits the template ``name`` (``"{id}"``: any stem), by their id (the
    part of the stem in place of ``{id}``, a match of ``id_pattern``); other files are not listed.
    """
    prefix, _, suffix = name.partition("{id}")
    fits = re.compile(f"{re.escape(prefix)}(?P<id>{id_pattern}){re.escape(suffix)}")
    index: dict[str, Path] = {}
    for path in list_images(folder, f"{what} folder", hint="check --root, or --images and --masks"):
        match = fits.fullmatch(path.stem)
        if match is None:
            continue
        if match["id"] in index:
            raise InputError(f"{what} folder {folder} holds two files with the stem {path.stem!r}: "
                             f"{index[match['id']].name} and {path.name}; images and masks are paired by stem.")
        index[match["id"]] = path
    return index


def find_pairs(
    images_dir: str | Path,
    masks_dir: str | Path,
    *,
    names: Mapping[str, str] | None = None,
    extra: Mapping[str, str | Path] | None = None,
    id_pattern: str = ".+",
) -> list[dict[str, Path]]:
    """
    Pair every image in ``images_dir`` with the mask of the same file stem in ``masks_dir``; an image without
    a mask is an error, a mask without an image is left out (:func:`unpaired_masks` lists them).

    Released fundus sets name the files of one image differently (DRIVE: ``21_training.tif``, ``21_manual1.gif``
    and ``21_training_mask.gif`` in three folders; CHASE_DB1: ``Image_01L.jpg`` and ``Image_01L_1stHO.png`` in
    one), so the rule is general: ``names`` maps a datalist key (``image``, ``label``, a key of ``extra``) to a
    stem template, default ``"{id}"``; files are paired by the part of their stems in place of ``{id}``, which
    must match ``id_pattern``, and files whose stem does not fit are not listed (CHASE_DB1's masks are not
    images). ``extra`` maps further keys of :data:`MASK_KEYS` (``fov``, ``label_2nd``) to their folders; each
    image needs one of those files as it needs a mask.
    """
    names = {"image": "{id}", "label": "{id}", **(names or {})}
    folders = {"image": Path(images_dir), "label": Path(masks_dir), **{k: Path(v) for k, v in (extra or {}).items()}}
    indexes = {k: _stem_index(folder, "images" if k == "image" else f"{MASK_KEYS[k]}s", names.get(k, "{id}"),
                              id_pattern) for k, folder in folders.items()}
    images = indexes["image"]
    if not images:  # files there, but none named as the layout names its images
        raise InputError(f"images folder {images_dir} holds no image named like {names['image'].format(id='<id>')} "
                         f"(<id>: {id_pattern}); check --root, or --images and --masks.")
    for key, index in list(indexes.items())[1:]:
        orphans = sorted(set(images) - set(index))
        if not orphans:
            continue
        if names[key] == "{id}" == names["image"]:
            what, shown = f"{MASK_KEYS[key]} of the same stem", [images[i].name for i in orphans[:5]]
        else:
            what, shown = MASK_KEYS[key], [f"{images[i].name} has no {names[key].format(id=i)}.*" for i in orphans[:5]]
        raise InputError(f"{len(orphans)} image(s) in {images_dir} have no {what} in {folders[key]}: "
                         f"{', '.join(shown)}{' ...' if len(orphans) > 5 else ''}; add their {MASK_KEYS[key]}s or move "
                         "the images out.")
    return [{k: indexes[k][i] for k in folders} for i in sorted(images)]


def unpaired_masks(
    images_dir: str | Path, masks_dir: str | Path, *, names: Mapping[str, str] | None = None, id_pattern: str = ".+",
    **_extra,
) -> list[Path]:
    """
    The masks in ``masks_dir`` that :func:`find_pairs` (same arguments; ``extra`` is not used) leaves out: no
    image in ``images_dir`` has their id.
    """
    names = names or {}
    images = _stem_index(Path(images_dir), "images", names.get("image", "{id}"), id_pattern)
    masks = _stem_index(Path(masks_dir), "masks", names.get("label", "{id}"), id_pattern)
    return [masks[s] for s in sorted(set(masks) - set(images))]


def check_pairs(pairs: Sequence[Mapping[str, Path]], progress: bool = True) -> dict:
    """
    Read every pair the way training will (EXIF orientation applied, see :class:`PILTiffReader`) and fail on
    the first bad one with an :class:`InputError` naming the file: unreadable or corrupt image or mask, or a
    mask whose size differs from its image. Returns a summary: masks with no foreground (allowed, listed),
    masks that were not exactly 0/1/255 (binarised by :func:`binarize_mask`) and, among them, label-index
    masks (lossless, maximum 2 to ``LABEL_INDEX_MAX``: every non-zero value counts as foreground).

    The other masks of a pair (the keys of :data:`MASK_KEYS`: ``fov``, ``label_2nd``) are read and checked the
    same way; a field of view with no pixel inside is an error too, as it would leave nothing to score. With
    fields of view the summary adds how many were not exactly 0/1/255 and ``label_outside_fov``, the share of
    the masks' foreground pixels outside their field of view (strokes past the disc's edge; 0.11 % on
    CHASE_DB1 with :func:`field_of_view`).

    Pairs with a ``clip`` (frames of one video) must have one frame size per clip, so that consecutive masks can
    be compared: an :class:`InputError` names the clip and a frame of its least common size otherwise.
    """
    image_reader, mask_reader = PILTiffReader(mode="RGB"), PILTiffReader()
    empty, not_binary, label_index, sizes, clip_sizes = [], 0, 0, set(), {}
    fovs, fov_not_binary, outside, foreground = 0, 0, 0, 0
    iterator = pairs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(pairs, desc="checking pairs", unit="pair", disable=None)  # None: off when not a TTY
    for pair in iterator:
        image = _read(image_reader, pair["image"], "image")
        masks, binary = {}, {}
        for key in (k for k in MASK_KEYS if k in pair):
            mask = _read(mask_reader, pair[key], MASK_KEYS[key])
            if image.shape[:2] != mask.shape[:2]:  # (W, H): PIL axes
                raise _size_mismatch(pair["image"], pair[key], image.shape[:2], mask.shape[:2], what=MASK_KEYS[key])
            masks[key] = mask[None] if mask.ndim == 2 else np.moveaxis(mask, -1, 0)
            binary[key] = binarize_mask(masks[key], lossless=is_lossless(pair[key])) > 0
        mask, lossless = masks["label"], is_lossless(pair["label"])
        if not binary["label"].any():
            empty.append(str(pair["label"]))
        if not np.isin(np.unique(mask), (0, 1, 255)).all():
            not_binary += 1
            peak = float(_grey(mask).max())
            if peak > 1 and _is_label_index(peak, lossless):
                label_index += 1
        if "fov" in masks:
            if not binary["fov"].any():
                raise InputError(f"field-of-view mask {pair['fov']} has no pixel inside the field of view (it is all "
                                 "zero); replace it, or remove its image from the data.")
            fovs += 1
            fov_not_binary += not np.isin(np.unique(masks["fov"]), (0, 1, 255)).all()
            outside += int((binary["label"] & ~binary["fov"]).sum())
            foreground += int(binary["label"].sum())
        sizes.add(image.shape[:2])
        if "clip" in pair:
            clip_sizes.setdefault(pair["clip"], {}).setdefault(image.shape[:2], []).append(pair["image"])
    for clip, by_size in clip_sizes.items():
        if len(by_size) > 1:
            ranked = sorted(by_size.items(), key=lambda kv: len(kv[1]))  # (size, frames), the least common first
            ((odd_w, odd_h), odd), ((w, h), usual) = ranked[0], ranked[-1]
            raise InputError(f"the frames of clip {clip} differ in size: {odd[0]} is {odd_h}×{odd_w} (H×W) but "
                             f"{len(usual)} of its {sum(map(len, by_size.values()))} frames are {h}×{w}, e.g. "
                             f"{usual[0]}; a clip's consecutive frames are compared: resize or remove the odd "
                             "frame(s).")
    summary = {"pairs": len(pairs), "empty_masks": empty, "masks_not_exactly_binary": not_binary,
               "label_index_masks": label_index, "distinct_sizes": len(sizes)}
    if fovs:
        summary.update(fov_masks=fovs, fov_masks_not_exactly_binary=int(fov_not_binary),
                       label_outside_fov=outside / max(foreground, 1))
    return summary


def _read(reader: PILTiffReader, path: Path, what: str) -> np.ndarray:
    try:
        array, _ = reader.get_data(reader.read(str(path)))
    except InputError:  # the reader's own, naming the file and the reason
        raise
    except Exception as e:  # anything else the conversion to an array may raise
        raise InputError(f"cannot read {what} {path}: {type(e).__name__}: {e}; replace the file.") from e
    return np.asarray(array)


def _size_mismatch(image, label, image_wh: Sequence[int], label_wh: Sequence[int], datalist=None,
                   what: str = "mask") -> InputError:
    """The one-sentence error for a mask whose (width, height) differs from its image's, naming both files."""
    where = f" (datalist {datalist})" if datalist is not None else ""
    return InputError(
        f"{what} {label} is {label_wh[1]}×{label_wh[0]} (H×W) but its image {image} is {image_wh[1]}×{image_wh[0]}"
        f"{where}; sizes are compared as a viewer shows the files (EXIF orientation applied): fix the pair or "
        "remove it from the data."
    )


def load_datalist(
    datalist: str | os.PathLike, key: str = "training", base_dir: str | os.PathLike | None = None
) -> list[dict]:
    """
    ``monai.data.load_decathlon_datalist(datalist, True, key, base_dir)``, checked before anything runs: the
    ``key`` list of the JSON file ``datalist`` with each entry's ``image`` and ``label`` joined to ``base_dir``
    (default: the datalist's folder) as absolute paths; other keys are kept, a string naming an existing path
    under ``base_dir`` joined to it, as MONAI does.

    Every check reads file headers only (no pixel is decoded), so that a bad datalist fails in seconds, with
    one :class:`~scripts.errors.InputError` sentence naming the file, instead of in the middle of training:
    the datalist missing or not valid JSON (line and column), ``key`` missing or not a list, an entry without
    an ``image`` or ``label`` path, a file that does not exist or cannot be opened as an image (TIFFs through
    ``tifffile``), and an image and mask of different sizes as a viewer shows them (EXIF orientation applied,
    as :class:`PILTiffReader` reads them). The other masks of :data:`MASK_KEYS` (a field of view ``fov``, a
    second observer's ``label_2nd``) are checked as the ``label`` is, in the entries that name one. Pixel-level
    corruption (a truncated JPEG) shows when the file is loaded, as an ``InputError`` of the reader. An empty
    ``validation`` list is allowed (training without validation); an empty list under any other key is an error.
    The keys of :data:`TEXT_KEYS` (``clip``) are names: kept as they are, and they must be non-empty strings.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"key must be a non-empty string such as 'training', got {key!r}.")
    path = Path(datalist)
    base = Path(base_dir) if base_dir is not None else path.parent
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise InputError(
            f"datalist {path} {state}; create it with `python -m scripts.prepare_data --images DIR --masks DIR "
            f"--output {path.parent}` or set --dataset_dir to the folder that holds your datalist.json."
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"datalist {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix "
                         "it or write it again with `python -m scripts.prepare_data`.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"datalist {path} cannot be read ({type(e).__name__}: {e}); write it again with "
                         "`python -m scripts.prepare_data`.") from e
    entries = content.get(key) if isinstance(content, dict) else None
    if not isinstance(entries, list):
        found = "has no" if not isinstance(content, dict) or key not in content else "has no list under"
        raise InputError(f"datalist {path} {found} key '{key}'; it must map '{key}' to a list of "
                         "{\"image\": ..., \"label\": ...} entries, as `python -m scripts.prepare_data` writes.")
    if not entries and key != "validation":
        raise InputError(f"datalist {path} has an empty '{key}' list; prepare the data again with a non-zero share "
                         f"for '{key}' or point --datalist at another file.")

    items = []
    for i, entry in enumerate(entries):
        files = ("image", *(k for k in MASK_KEYS if k == "label" or isinstance(entry, dict) and k in entry))
        lacking = [k for k in files if not isinstance(entry, dict) or not isinstance(entry.get(k), str) or not entry[k]]
        if lacking:
            rule = ("every entry needs an 'image' and a 'label' file name" if lacking[0] in ("image", "label") else
                    f"'{lacking[0]}', where given, must name a file")
            raise InputError(f"entry {i} of '{key}' in datalist {path} has no '{lacking[0]}' path "
                             f"({json.dumps(entry)[:80]}); {rule}.")
        for k in (k for k in TEXT_KEYS if k in entry and (not isinstance(entry[k], str) or not entry[k])):
            raise InputError(f"entry {i} of '{key}' in datalist {path} has '{k}' {json.dumps(entry[k])}; it must be "
                             f"a non-empty string, the name of the {k} (write it in quotes).")
        item = {}
        for k, v in entry.items():
            if k in TEXT_KEYS:
                item[k] = v
                continue
            joined = os.path.abspath(os.path.join(base, v)) if isinstance(v, str) else v
            # image and masks are always files under base_dir; other strings only when they name one (MONAI's rule)
            item[k] = joined if k in files or (isinstance(v, str) and os.path.exists(joined)) else v
        items.append(item)

    missing = [(k, item[k]) for item in items for k in ("image", *MASK_KEYS)
               if k in item and not os.path.isfile(item[k])]
    if missing:
        (what, first), more = missing[0], len(missing) - 1
        others = f" (and {more} more of its files are missing)" if more else ""
        raise InputError(
            f"{what} file {first} named in datalist {path} does not exist{others}; its paths are relative to "
            f"{base}: set --dataset_dir to the folder they are relative to, or run `python -m scripts.prepare_data` "
            "again."
        )
    for item in items:
        sizes = {}
        for k in ("image", *(k for k in MASK_KEYS if k in item)):
            try:
                sizes[k] = _header_size(item[k])
            except Exception as e:  # Pillow and tifffile raise many types for foreign or broken headers
                raise _cannot_read(item[k], e, datalist=path) from e
            if sizes[k] != sizes["image"]:
                raise _size_mismatch(item["image"], item[k], sizes["image"], sizes[k], datalist=path,
                                     what=MASK_KEYS[k])
    return items


def split_pairs(
    pairs: Sequence[Mapping[str, Path]],
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    test_names: Sequence[str] | None = None,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, list]:
    """
    Split into ``training``, ``validation`` and ``test``: the thesis's seeded 8:2 train/test split with 10% of
    train held out for validation, or, with ``test_names`` (file names or stems, e.g. PraNet's 100 Kvasir-SEG
    test images), exactly those as test and the seeded validation fraction from the rest.

    ``groups`` (one per pair: the subject, e.g. the child of CHASE_DB1's left and right eye, or the video clip of a
    frame) makes the seeded draws take whole groups, the fractions counting groups, so that no subject is on both
    sides of a split; without it every pair is its own group. ``test_fraction`` 1 makes every pair a test pair (a
    set kept for evaluation, e.g. SUN-SEG's test folders).
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}.")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    pairs = list(pairs)
    groups = list(range(len(pairs))) if groups is None else list(groups)
    if test_names is not None:
        wanted = {Path(n.strip()).stem for n in test_names if n.strip()}
        known = {p["image"].stem for p in pairs}
        missing = sorted(wanted - known)
        if missing:
            raise ValueError(f"{len(missing)} test name(s) of the split file are not among the images: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        is_test = [p["image"].stem in wanted for p in pairs]
    else:
        is_test = _draw(groups, test_fraction, rng)
    rest = [i for i in range(len(pairs)) if not is_test[i]]
    is_val = _draw([groups[i] for i in rest], val_fraction, rng)
    return {
        "training": [pairs[i] for i, val in zip(rest, is_val) if not val],
        "validation": [pairs[i] for i, val in zip(rest, is_val) if val],
        "test": [p for p, test in zip(pairs, is_test) if test],
    }


def _draw(groups: Sequence[Hashable], fraction: float, rng: np.random.Generator) -> list[bool]:
    """Which items a seeded draw of ``round(fraction * number of groups)`` whole groups takes."""
    unique = list(dict.fromkeys(groups))
    order = rng.permutation(len(unique))
    chosen = {unique[i] for i in order[: int(round(fraction * len(unique)))]}
    return [g in chosen for g in groups]


def write_datalist(splits: Mapping[str, Sequence[Mapping[str, Path]]], output_dir: str | Path, summary: dict) -> Path:
    """
    Write ``datalist.json``: every file of each pair (``image``, ``label`` and the other :data:`MASK_KEYS` it
    has) as a path relative to ``output_dir`` (the bundle's ``dataset_dir``), its other keys (:data:`TEXT_KEYS`:
    ``clip``) as they are, and the summary; written to a temporary name and renamed, so that a failure never leaves
    half a datalist.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(Path(p).resolve(), output_dir.resolve())  # noqa: E731
    files = ("image", *MASK_KEYS)
    datalist = {k: [{key: rel(value) if key in files else value for key, value in p.items()} for p in v]
                for k, v in splits.items()}
    datalist["summary"] = {**summary, **{f"num_{k}": len(v) for k, v in splits.items()}}
    path = output_dir / "datalist.json"
    with atomic_write(path) as f:
        f.write(json.dumps(datalist, indent=2) + "\n")
    return path
