# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Monte Carlo dropout uncertainty (method.md §3): N stochastic foreground maps per image and the per-pixel maps
computed from them (mean, predictive variance, predictive entropy, mutual information).

:func:`mc_foreground_samples` is the fast pass: the deterministic encoder of :class:`~scripts.networks.DropoutUNet`
(everything before the first dropout, method.md §6) runs once per image and only the decoder runs N times, with
the N samples of all images batched together. :func:`mc_foreground_samples_naive` is the reference it is tested
and benchmarked against: N full forward passes, one after another.
"""

from __future__ import annotations

import contextlib

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type
from torch import nn

from scripts.networks import mc_dropout
from scripts.errors import InputError, is_int

__all__ = [
    "binary_entropy", "auto_chunk_size", "check_chunk_size", "mc_foreground_samples", "mc_foreground_samples_naive",
    "uncertainty_maps", "MCDropoutInferer",
]


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """
    Elementwise binary entropy in nats, ``H(p) = -p log p - (1 - p) log(1 - p)``, i.e. the entropy of the
    two-class distribution ``[1 - p, p]`` (the softmax output of a 2-channel network, of which ``p`` is channel 1).

    Never sum ``-p log p`` over a single foreground channel instead: that drops the ``(1 - p)`` term.

    ``0 log 0`` is taken as 0, so ``H(0) = H(1) = 0`` exactly and the result is finite everywhere on ``[0, 1]``;
    its maximum is ``H(1/2) = log 2``. The second term is evaluated as ``(1 - p) log1p(-p)``, which stays accurate
    for ``p`` so small that ``1 - p`` rounds to 1. Inputs outside ``[0, 1]`` give NaN.

    Args:
        p: probabilities, any shape. Computed in at least float32 (half precision is promoted).

    Returns:
        ``H(p)``, same shape as ``p``, dtype ``promote_types(p.dtype, float32)``.
    """
    p = p.to(torch.promote_types(p.dtype, torch.float32))
    # xlogy / xlog1py return 0 where their first argument is 0, whatever the log is (-inf at p = 0 or 1).
    return -(torch.special.xlogy(p, p) + torch.special.xlog1py(1.0 - p, -p))


def uncertainty_maps(samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Per-pixel uncertainty of N Monte Carlo samples of a foreground probability map (method.md §3).

    With ``samples[n] = ŷ⁽ⁿ⁾``, n = 1..N, and ``H`` the binary entropy (:func:`binary_entropy`):

        mean                ȳ = (1/N) Σ_n ŷ⁽ⁿ⁾
        variance            (1/N) Σ_n (ŷ⁽ⁿ⁾ − ȳ)²            (population variance, ``torch.var(correction=0)``)
        entropy             H(ȳ)                              (predictive entropy, total uncertainty)
        mutual_information  H(ȳ) − (1/N) Σ_n H(ŷ⁽ⁿ⁾)          (epistemic part)

    The mutual information is ``>= 0`` mathematically (H is concave, Jensen), but it is a difference of two
    close numbers and can come out slightly negative by rounding (of the order of 1e-7 in float32 where the
    samples agree). It is returned as computed, not clamped, so that such values stay visible; clamp at the
    consumer if a strictly non-negative map is needed. With N = 1, or identical samples, it is 0 up to rounding.

    Works on any device and outside training (no autograd state is needed or created beyond the inputs').

    Args:
        samples: foreground probabilities in ``[0, 1]``, shape ``(N, *shape)`` with N >= 1 (for example
            ``(N, B, H, W)`` from :func:`mc_foreground_samples`). Computed in at least float32.

    Returns:
        ``{"mean", "variance", "entropy", "mutual_information"}``, each of shape ``shape`` and dtype
        ``promote_types(samples.dtype, float32)``.

    Raises:
        ValueError: When ``samples`` has no sample dimension or no samples.
    """
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"samples must be a tensor of shape (N, *shape), got {type(samples).__name__}.")
    if samples.ndim < 1 or samples.shape[0] < 1:
        raise ValueError(f"samples must have shape (N, *shape) with N >= 1, got {tuple(samples.shape)}.")
    # Half precision would lose the mutual information (a small difference of entropies) to rounding.
    x = samples.to(torch.promote_types(samples.dtype, torch.float32))
    mean = x.mean(0)
    variance = (x - mean).square().mean(0)  # two-pass: no cancellation of E[ŷ²] − ȳ²
    entropy = binary_entropy(mean)
    expected_entropy = binary_entropy(x).mean(0)  # aleatoric part, (1/N) Σ H(ŷ⁽ⁿ⁾)
    return {
        "mean": mean,
        "variance": variance,
        "entropy": entropy,
        "mutual_information": entropy - expected_entropy,
    }


def _unwrap(network: nn.Module) -> nn.Module:
    """The module itself under (Distributed)DataParallel: its encode/decode are not on the wrapper, and the
    wrapper's forward would synchronise buffers across processes, which a pass that must not touch the model
    should not do."""
    if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return network.module
    return network


def _check_common(network: nn.Module, images: torch.Tensor, num_samples: int) -> None:
    if not isinstance(network, nn.Module):
        raise ValueError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    if not is_int(num_samples, 1):
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}.")
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (B, C, H, W), got {shape}.")
    if images.shape[0] < 1:
        raise ValueError(f"images must hold at least one image, got shape {tuple(images.shape)}.")


def _autocast(images: torch.Tensor):
    # Mixed precision on the GPU, as the bundle's trainer and evaluator use (amp: device is cuda); float32 on CPU.
    return torch.autocast("cuda") if images.device.type == "cuda" else contextlib.nullcontext()


def _foreground(logits: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """Channel 1 of the softmax of ``(k, 2, H, W)`` logits, in float32 (autocast may have produced half)."""
    if tuple(logits.shape) != expected:
        raise ValueError(
            f"the network must return (batch, 2, H, W) background/foreground logits of the input's size, "
            f"expected {expected}, got {tuple(logits.shape)}."
        )
    return torch.softmax(logits.float(), dim=1)[:, 1]


def auto_chunk_size(skip: torch.Tensor) -> int:
    """
    The (sample, image) pairs per decoder call that the fast MC pass uses by default, from the device and the
    network's widest activation: ``skip`` is the full-resolution encoder output of one batch, ``(B, f0, H, W)``.

    On a GPU, 64 pairs (memory, not speed, is the limit; lower ``mc_chunk_size`` if it runs out). On a CPU, as
    many pairs as keep the decoder's largest tensor (the skip concatenated with the upsampled features,
    ``2·f0·H·W`` floats a pair) within 8 MiB, and at most 8: measured with ``benchmarks/mc_pass.py`` (one
    thread), the Table 1 U-Net at 224 px is fastest at 1 pair (25.7 MB each; larger blocks are mapped afresh by
    glibc on every allocation), and narrow networks at 8 (features 16..128 at 96 px: 0.084 s/image at 7-8
    pairs, 0.106 at 28, 0.140 at 64; features 8..64 at 64 px: 0.020 at 8, 0.022 at 32, 0.030 at 1).
    """
    if skip.device.type != "cpu":
        return 64
    pair_bytes = 2 * skip[0].numel() * skip.element_size()
    return max(1, min(8, (8 << 20) // pair_bytes))


def check_chunk_size(chunk_size) -> int | str:
    """``chunk_size`` if it is ``"auto"`` or an integer >= 1; otherwise an :class:`InputError`."""
    if chunk_size != "auto" and not is_int(chunk_size, 1):
        raise InputError(f"--mc_chunk_size must be auto or an integer >= 1, got {chunk_size!r} "
                         f"({type(chunk_size).__name__}).")
    return chunk_size


def mc_foreground_samples(
    network: nn.Module, images: torch.Tensor, num_samples: int, chunk_size: int | str = "auto"
) -> torch.Tensor:
    """
    N Monte Carlo dropout foreground maps per image, running the deterministic encoder once.

    The network's ``encode(images)`` (everything before the first dropout, so identical for every sample) runs
    once on the B images; its feature maps are then repeated for the ``N·B`` (sample, image) pairs, ordered
    sample-major (pair ``n·B + b`` is sample n of image b), and ``decode`` runs on at most ``chunk_size`` pairs
    at a time. Per image this costs ``encode + N·decode`` instead of ``N·(encode + decode)``; ``chunk_size``
    bounds the decoder's activation memory (about ``chunk_size`` full-resolution decoder passes at once). On a
    GPU larger chunks are faster; on CPU with glibc's default malloc, blocks over 32 MB are mapped afresh on
    every allocation, so at 224 px full width ``chunk_size=1`` is fastest unless ``MALLOC_MMAP_THRESHOLD_`` is
    raised (``benchmarks/mc_pass.py``).

    The pass changes nothing in the model: it runs under ``torch.inference_mode()`` (no graph, no ``.grad``)
    inside :func:`~scripts.networks.mc_dropout` (only the dropout layers sample; BatchNorm uses and keeps its
    running statistics; every module's train/eval mode is restored afterwards, also on error). On CUDA it runs
    under ``torch.autocast("cuda")``; the maps are returned in float32 either way.

    Random numbers: the dropout masks are drawn from the global torch generator of the images' device (the CPU
    generator for CPU tensors, the device's CUDA generator for CUDA tensors), one mask per dropout layer per
    ``decode`` call, so the draws depend on ``chunk_size``. This function neither seeds nor saves that
    generator: a caller that must keep the training's random stream unchanged wraps the whole pass in
    ``torch.random.fork_rng(devices=...)`` (and seeds inside it for reproducible maps). With ``N·B <= chunk_size``
    masks are drawn for the (N·B, ...) batch in one call; with ``chunk_size == B`` the draws are exactly those of
    N successive ``network(images)`` calls (:func:`mc_foreground_samples_naive`).

    Args:
        network: a network with ``encode(x) -> list[Tensor]`` (deterministic) and ``decode(feats) -> logits``
            with ``decode(encode(x)) == network(x)``, 2 output channels and at least one dropout layer, such as
            :class:`~scripts.networks.DropoutUNet`; a ``DataParallel``/``DistributedDataParallel`` wrapper is
            unwrapped (its ``.module`` is used, without the wrapper's cross-process buffer sync).
        images: ``(B, C, H, W)`` on the network's device.
        num_samples: N >= 1, stochastic passes per image.
        chunk_size: at most this many (sample, image) pairs per ``decode`` call, >= 1, or ``"auto"``
            (:func:`auto_chunk_size`).

    Returns:
        ``(N, B, H, W)`` float32 foreground probabilities (softmax over channels, channel 1); an ordinary tensor
        (not an inference tensor), with ``requires_grad=False``.

    Raises:
        ValueError: When an argument is invalid, the network has no ``encode``/``decode`` or no dropout layer,
            or its output is not ``(batch, 2, H, W)``.
    """
    _check_common(network, images, num_samples)
    check_chunk_size(chunk_size)
    net = _unwrap(network)
    if not (callable(getattr(net, "encode", None)) and callable(getattr(net, "decode", None))):
        raise ValueError(
            f"{type(net).__name__} has no encode/decode methods: the fast MC pass needs the network split at its "
            f"first dropout layer (like DropoutUNet); use mc_foreground_samples_naive for other networks."
        )
    b, _, h, w = images.shape
    pairs = num_samples * b
    # Allocated outside inference mode so that callers get an ordinary tensor they may modify in place;
    # writing into it from inference mode is allowed.
    out = torch.empty(pairs, h, w, dtype=torch.float32, device=images.device)
    with mc_dropout(net), torch.inference_mode(), _autocast(images):
        feats = net.encode(images)
        if chunk_size == "auto":
            chunk_size = auto_chunk_size(feats[0])
        for start in range(0, pairs, chunk_size):
            stop = min(start + chunk_size, pairs)
            # Pair i is image i % B: a gather of only this chunk's pairs, so memory stays bounded by chunk_size
            # (expanding all N·B copies first would materialise them).
            idx = torch.arange(start, stop, device=images.device) % b
            chunk = [f.index_select(0, idx) for f in feats]
            out[start:stop] = _foreground(net.decode(chunk), (stop - start, 2, h, w))
    return out.view(num_samples, b, h, w)


def mc_foreground_samples_naive(network: nn.Module, images: torch.Tensor, num_samples: int) -> torch.Tensor:
    """
    The reference MC pass: ``num_samples`` full ``network(images)`` forward passes, one after another.

    Same handling as :func:`mc_foreground_samples` (wrapper unwrapped, ``mc_dropout``, ``inference_mode``,
    autocast on CUDA, global random stream neither seeded nor saved), same output: ``(N, B, H, W)`` float32
    foreground probabilities. Works for any 2-channel network with a dropout layer (no ``encode``/``decode``
    needed), at N times the encoder cost.
    """
    _check_common(network, images, num_samples)
    net = _unwrap(network)
    b, _, h, w = images.shape
    out = torch.empty(num_samples, b, h, w, dtype=torch.float32, device=images.device)
    with mc_dropout(net), torch.inference_mode(), _autocast(images):
        for n in range(num_samples):
            out[n] = _foreground(net(images), (b, 2, h, w))
    return out


class MCDropoutInferer(Inferer):
    """
    A MONAI inferer that predicts with Monte Carlo dropout and returns the uncertainty with the prediction, so
    that bundle inference (``configs/inference.yaml``, ``mc_samples`` > 0) reuses the training's fast pass.

    For ``num_samples`` = N >= 2 it runs :func:`mc_foreground_samples` (encoder once, decoder N times) and
    returns ``(B, 5, H, W)`` float32 with the channels of :meth:`output_names`:

        [1 − ȳ, ȳ, variance, entropy, mutual information]        (ȳ the mean foreground probability)

    For ``num_samples`` = 0 it is plain deterministic inference: one forward pass (in the network's current
    mode, eval in an evaluator) and the softmax, ``(B, 2, H, W)`` = ``[1 − p, p]``. Either way channels 0-1 are
    class probabilities, so the same postprocessing makes the mask.

    Args:
        num_samples: N, dropout samples per image (>= 2), or 0 for deterministic inference.
        chunk_size: at most this many (sample, image) pairs per decoder call (see :func:`mc_foreground_samples`).
    """

    MAPS = ("variance", "entropy", "mutual_information")

    def __init__(self, num_samples: int = 10, chunk_size: int | str = "auto") -> None:
        super().__init__()
        if not is_int(num_samples, 0) or num_samples == 1:
            raise InputError(f"--mc_samples must be 0 (inference without MC dropout) or an integer >= 2, got "
                             f"{num_samples!r} ({type(num_samples).__name__}).")
        check_chunk_size(chunk_size)
        self.num_samples, self.chunk_size = num_samples, chunk_size

    @classmethod
    def output_names(cls, num_samples: int) -> list[str]:
        """Names of the output channels: ``background, probability`` and, for N >= 2, the three maps."""
        return ["background", "probability", *(cls.MAPS if num_samples else ())]

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        if self.num_samples == 0:
            with _autocast(inputs):
                logits = network(inputs, *args, **kwargs)
            foreground = _foreground(logits, (inputs.shape[0], 2, *inputs.shape[2:]))
            out = torch.stack([1.0 - foreground, foreground], dim=1)
        else:
            maps = uncertainty_maps(mc_foreground_samples(network, inputs, self.num_samples, self.chunk_size))
            out = torch.stack([1.0 - maps["mean"], maps["mean"], *(maps[k] for k in self.MAPS)], dim=1)
        # the input's meta data and applied transforms ride along, as on a network's output, for Invertd
        return convert_to_dst_type(out, inputs, dtype=out.dtype)[0]
