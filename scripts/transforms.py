# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Transforms of the bundle. Inference (``configs/inference.yaml``) downsamples a frame with ``area`` interpolation,
as training does (box averaging: alias-free, and a 36-megapixel frame takes a fraction of a second), but the
probabilities must come back to the frame's size bilinearly: ``Invertd`` would undo an ``area`` resize with
``area`` (blocky) or nearest. :class:`ResizeToOriginald` does that one step by hand, from the frame's size as it
was loaded.
:class:`DualThreshold` (``d``) is the dual-threshold decision of thin structures (tubular.md §2), a
drop-in for ``AsDiscrete(d)``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resize, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type
from scipy import ndimage

from scripts.errors import InputError, check_int, check_number

__all__ = ["original_size", "ResizeToOriginald", "DualThreshold", "DualThresholdd"]

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


class DualThreshold(Transform):
    """
    Dual-threshold iteration (DTI; Liu et al. 2022, tubular.md §2): a foreground probability map ``u``
    becomes the mask of the connected components of ``{u > low}`` that hold at least one pixel of ``u > high``,

        DTI(u) = ∪ { C : C a connected component of {u > τ_L}, max_C u > τ_H }          (τ_L = low, τ_H = high)

    i.e. weak pixels are kept only where they connect to a strong one, so a vessel's faint stretches survive
    between confident ones while isolated faint blobs do not. Both comparisons are strict, as in the spec:
    ``u = high`` seeds nothing, ``u = low`` is never grown into; ``low = high`` is the plain threshold ``u > high``
    (every component of ``{u > high}`` seeds itself), and ``high = 1`` keeps nothing.

    Input: channel-first ``(C, *spatial)``, 2-D or 3-D (``(C, H, W)`` or ``(C, W, H)``: connectivity is
    symmetric, the axis order does not matter), numpy or torch; ``u`` is its only channel when ``C = 1``,
    otherwise channel 1, the foreground of ``[1 − p, p, ...]`` (``MCDropoutInferer``'s ``pred``, or the softmax
    of a 2-channel network's logits). Probabilities are required, not logits. Output: the input's type
    (MetaTensor meta data kept), device and dtype (float32 if it is not floating), ``(1, *spatial)`` with values
    {0, 1}, or with ``to_onehot`` ``(2, *spatial)`` = ``[1 − m, m]``, as ``AsDiscrete(argmax=True,
    to_onehot=2)`` gives. The labelling runs on the CPU (scipy): a GPU tensor makes a round trip.

    Args:
        low: τ_L in [0, 1], the threshold a pixel must exceed to be grown into.
        high: τ_H in [low, 1], the threshold a pixel must exceed to seed its component.
        connectivity: neighbours are pixels at most this many orthogonal hops away, 1 to the spatial rank;
            None (the spec's) means the rank: 8 neighbours in 2-D (26 in 3-D). 1 gives 4 neighbours, as
            ``skimage.filters.apply_hysteresis_threshold``.
        to_onehot: output ``[1 − m, m]`` (2 channels) instead of ``m`` (1 channel).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, low: float = 0.3, high: float = 0.5, connectivity: int | None = None,
                 to_onehot: bool = False) -> None:
        self.low = check_number(low, "DualThreshold low (τ_L)", 0.0, 1.0)
        self.high = check_number(high, f"DualThreshold high (τ_H, at least low = {self.low})", self.low, 1.0)
        self.connectivity = None if connectivity is None else check_int(connectivity, "DualThreshold connectivity", 1)
        if not isinstance(to_onehot, bool):
            raise InputError(f"DualThreshold to_onehot must be true or false, got {to_onehot!r}.")
        self.to_onehot = to_onehot

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        shape = tuple(img.shape)
        rank = len(shape) - 1
        if rank < 2 or shape[0] < 1:  # a 1-D map is more likely a (H, W) one missing its channel: refuse both
            raise InputError(f"DualThreshold expects a channel-first (C, H, W[, D]) probability map, got {shape}.")
        if self.connectivity is not None and self.connectivity > rank:
            raise InputError(f"DualThreshold connectivity must be at most the spatial rank {rank}, "
                             f"got {self.connectivity}.")
        u = convert_data_type(img[0 if shape[0] == 1 else 1], np.ndarray)[0]
        # Catches logits fed by mistake; the slack admits interpolation's rounding just outside [0, 1].
        if u.size and not (u.min() >= -1e-3 and u.max() <= 1 + 1e-3):
            raise InputError(f"DualThreshold expects probabilities in [0, 1], got values in [{u.min()}, {u.max()}]: "
                             "apply Activationsd(softmax=True) to the network's logits first.")
        # Why one labelling pass is the iteration "V = {u > high}; add every pixel > low with a neighbour in V,
        # until nothing changes": growth only steps through pixels > low, so it never leaves the component of
        # {u > low} it started in, and within a component it reaches every pixel (each is joined to a seed by a
        # path of pixels > low, and the iteration walks it one step per round). Conversely a pixel enters only
        # next to one already in V, so only seeded components ever do: the fixed point is the union of the
        # components of {u > low} that hold a seed. Seeds are > high >= low, so their labels are >= 1.
        structure = ndimage.generate_binary_structure(rank, self.connectivity or rank)
        labels, count = ndimage.label(u > self.low, structure=structure)
        # (compress, not labels[u > high]: numpy's 2-D boolean indexing is several times slower)
        seeded = np.bincount(np.compress((u > self.high).ravel(), labels.ravel()), minlength=count + 1) > 0
        mask = np.take(seeded, labels)[None]
        out = np.concatenate([~mask, mask]) if self.to_onehot else mask
        floating = img.is_floating_point() if isinstance(img, torch.Tensor) else np.issubdtype(img.dtype, np.floating)
        return convert_to_dst_type(out, img, dtype=img.dtype if floating else np.float32)[0]


class DualThresholdd(MapTransform):
    """
    Dictionary version of :class:`DualThreshold`, for a postprocessing chain. It replaces the decision
    ``AsDiscreted(argmax=True, to_onehot=2)`` with ``to_onehot: true`` (``(2, H, W)`` out); in
    ``validate#postprocessing``, whose ``pred`` is logits, after a softmax::

        - {_target_: Activationsd, keys: pred, softmax: true}
        - {_target_: scripts.transforms.DualThresholdd, keys: pred, low: 0.3, high: 0.5, to_onehot: true}
        - {_target_: AsDiscreted, keys: label, to_onehot: 2}

    and ``AsDiscreted(threshold=0.5)`` on the ``(1, H, W)`` foreground probability of ``configs/inference.yaml``
    as it is (``(1, H, W)`` out). ``low = high = 0.5`` gives back the argmax decision exactly (``p = 0.5`` is
    background in both); ``threshold=0.5`` differs from it, and from DTI, only where ``p = 0.5`` (``>=`` there).
    """

    backend = DualThreshold.backend

    def __init__(self, keys: KeysCollection, low: float = 0.3, high: float = 0.5, connectivity: int | None = None,
                 to_onehot: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = DualThreshold(low, high, connectivity, to_onehot)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d
