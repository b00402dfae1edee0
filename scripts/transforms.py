# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Transforms of the bundle. Inference (``configs/inference.yaml``) downsamples a frame with ``area`` interpolation,
as training does (box averaging: alias-free, and a 36-megapixel frame takes a fraction of a second), but the
probabilities must come back to the frame's size bilinearly: ``Invertd`` would undo an ``area`` resize with
``area`` (blocky) or nearest. :class:`ResizeToOriginald` does that one step by hand, from the frame's size as it
was loaded.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize

__all__ = ["original_size", "ResizeToOriginald"]

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
