# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Monte Carlo dropout uncertainty (method.md §3) for any 2D segmentation network with dropout: N stochastic
foreground maps per image, the per-pixel maps computed from them (mean, predictive variance, predictive entropy,
mutual information), and the checks a network must pass before a run relies on them.

:func:`mc_foreground_samples` is the one sampler that the difficulty pass, MC inference, the label audit and
MONAI Label's scoring use. Where the network can be split at its first dropout layer (``encode``/``decode``
methods, as :class:`~scripts.networks.DropoutUNet` has, or MONAI's ``FlexibleUNet``, whose dropout sits only in
its decoder) the deterministic part runs once per image and only the rest N times; otherwise it runs N full
forward passes. Either way the N·B (sample, image) pairs run batched in chunks. :func:`mc_foreground_samples_naive`
is the reference it is tested and benchmarked against: N full forward passes, one after another.
:func:`check_mc_network` refuses, with one sentence naming the class and what to set, a network on which any of
this would silently give wrong maps.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from monai.inferers import Inferer
from monai.networks.nets import FlexibleUNet
from monai.utils import convert_to_dst_type
from torch import nn

from scripts.data import spatial_size
from scripts.networks import DiffusionRefiner, DropoutUNet, FullResolutionUNet, dropout_argument, mc_dropout
from scripts.errors import InputError, is_int

__all__ = [
    "binary_entropy", "auto_chunk_size", "decoder_pair_bytes", "check_chunk_size", "mc_foreground_samples",
    "mc_foreground_samples_naive", "uncertainty_maps", "encoder_split", "check_mc_network", "MCDropoutInferer",
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
    """The module itself under (Distributed)DataParallel: the split is not on the wrapper, and the wrapper's
    forward would synchronise buffers across processes, which a pass that must not touch the model should not do."""
    if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return network.module
    return network


def encoder_split(network: nn.Module) -> tuple[Callable, Callable] | None:
    """
    ``(encode, decode)`` with ``decode(encode(x)) == network(x)`` and no dropout in ``encode``, for the networks
    known to allow it; None otherwise, and the sampler runs full forward passes, which are right for any network.

    - the bundle's :class:`~scripts.networks.DropoutUNet`, :class:`~scripts.networks.FullResolutionUNet` and
      :class:`~scripts.networks.DiffusionRefiner`: their ``encode`` and ``decode`` methods;
    - MONAI's ``FlexibleUNet``: its ``dropout`` is applied only in the decoder blocks (the encoder backbones'
      own dropout, EfficientNet's before its classifier, never runs), so ``encoder`` is deterministic and
      ``segmentation_head(decoder(features, skip_connect))`` is the rest of its ``forward``.

    Known classes only, not any class with ``encode``/``decode`` methods: MONAI's ``SegResNet`` has both, with
    another signature and its dropout inside ``encode``. :func:`check_mc_network` verifies the split against the
    full pass, same dropout draws, before a run relies on it.
    """
    if isinstance(network, (DropoutUNet, FullResolutionUNet, DiffusionRefiner)):
        return network.encode, network.decode
    if isinstance(network, FlexibleUNet):
        return network.encoder, lambda feats: network.segmentation_head(network.decoder(feats, network.skip_connect))
    return None


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


def _foreground(logits, expected: tuple[int, ...]) -> torch.Tensor:
    """Channel 1 of the softmax of ``(k, 2, H, W)`` logits, in float32 (autocast may have produced half)."""
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != expected:
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        raise ValueError(
            f"the network must return (batch, 2, H, W) background/foreground logits of the input's size, "
            f"expected {expected}, got {found}."
        )
    return torch.softmax(logits.float(), dim=1)[:, 1]


def _largest_bytes(obj) -> int:
    """Bytes of the largest tensor in ``obj`` (a tensor, or lists, tuples and dicts of them, nested)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return max((_largest_bytes(o) for o in obj), default=0)
    return 0


@contextlib.contextmanager
def _largest_activation(net: nn.Module):
    """
    Yields a one-item list that holds, when the block ends, the bytes of the largest tensor that a module of ``net``
    took or returned while it ran (forward pre-hooks and hooks). A tensor made by a functional op and used only by
    other functional ops is not seen; in the bundle's networks the largest is a module's input (the concatenation
    that an ``UpCat`` block's convolutions read).
    """
    largest = [0]

    def see(obj) -> None:
        largest[0] = max(largest[0], _largest_bytes(obj))

    hooks = []
    try:
        # a ScriptModule takes no hooks: its input and output are seen by its parent's
        for m in (m for m in net.modules() if not isinstance(m, torch.jit.ScriptModule)):
            hooks.append(m.register_forward_pre_hook(lambda m, args, kwargs: see((args, kwargs)), with_kwargs=True))
            hooks.append(m.register_forward_hook(lambda m, args, out: see(out)))
        yield largest
    finally:
        for hook in hooks:
            hook.remove()


def decoder_pair_bytes(network: nn.Module, images: torch.Tensor) -> int | None:
    """
    The figure :func:`auto_chunk_size` sizes a CPU chunk from: the bytes of the largest tensor that the stochastic
    part of :func:`encoder_split` (``decode``) takes or returns for one (sample, image) pair of ``images``
    ``(B, C, H, W)``, in sampling mode; None for a network without a split. One run of the split on the first image.
    """
    net = _unwrap(network)
    split = encoder_split(net)
    if split is None:
        return None
    encode, decode = split
    with mc_dropout(net), torch.inference_mode(), _autocast(images):
        feats = encode(images[:1])
        with _largest_activation(net) as largest:
            decode(feats)
    return largest[0]


def auto_chunk_size(features: torch.Tensor, split: bool = True, pair_bytes: int | None = None) -> int:
    """
    The (sample, image) pairs per network call that :func:`mc_foreground_samples` uses by default.

    With the encoder-once split (``split``), ``features`` is the split's first output for one batch (for the
    bundle's U-Nets the full-resolution skip, ``(B, f0, H, W)``): on a GPU 64 pairs (memory, not speed, is the
    limit; lower ``mc_chunk_size`` if it runs out); on a CPU as many pairs as keep the decoder's largest tensor
    within 8 MiB, and at most 8: ``max(1, min(8, 8 MiB // pair_bytes))``.

    ``pair_bytes`` is that largest tensor for one pair, as :func:`mc_foreground_samples` measures it on a CPU (with
    forward hooks, on the first sample of the B images of each call, which it runs as one chunk: no extra work;
    :func:`decoder_pair_bytes` measures it the same way). Measured, float32,
    ``f0``, ``f1`` the first two widths (in parentheses the chunk of the former estimate, ``2·f0·H·W`` floats):

    - :class:`~scripts.networks.DropoutUNet`: ``2·f0·H·W`` floats, ``up4``'s concatenation of the skip and the
      upsampled features: Table 1 widths at 224 px 25.7 MB -> 1 pair; ``[16,32,64,128,128]`` at 96 px 1.18 MB
      -> 7 (the same);
    - :class:`~scripts.networks.FullResolutionUNet`: ``(2·f0 + f1)·H·W`` floats, ``up_full``'s concatenation of
      the skip, the residual stream and the upsampled ``u_1``, twice the U-Net's at ``f1 = 2·f0``: the default
      ``[32,64,128,256]`` at 64 px 2.10 MB -> 4 (8); configs/vessel/frunet.yaml's ``[16,32,64,128]`` at 96 px
      2.36 MB -> 3 (7), at its 48 px patches 0.59 MB -> 8 (8);
    - :class:`~scripts.networks.DiffusionRefiner`: its backbone's (the solver's maps have 1 or 2 channels);
    - MONAI's ``FlexibleUNet``, whose first encoder output is at H/2, at 224 px: configs/network/flexible_unet.yaml
      (resnet10, decoder ``[64,32,16,16,8]``) 3.61 MB -> 2 (1: its 64-channel stem overstated it);
      efficientnet-b0 with MONAI's default decoder 6.42 MB -> 1 (5, a quarter of the measured figure).

    Without ``pair_bytes`` (a caller that has no network, as ``benchmarks/mc_inference.py``), it is estimated as
    ``2·f0·H·W`` from ``features``: right for DropoutUNet only.

    Why 8 MiB and 8 pairs, measured with ``benchmarks/mc_pass.py`` (one thread): the Table 1 U-Net at 224 px is
    fastest at 1 pair (larger blocks are mapped afresh by glibc on every allocation), and narrow networks at 8
    (features 16..128 at 96 px: 0.084 s/image at 7-8 pairs, 0.106 at 28, 0.140 at 64; features 8..64 at 64 px:
    0.020 at 8, 0.022 at 32, 0.030 at 1).

    With full forward passes, ``features`` is the batch of images ``(B, C, H, W)``: nothing tells a network's
    activation size before it runs, so a chunk is the batch itself on a CPU (B pairs: one training batch's
    memory without its graph) and at least 64 pairs on a GPU.
    """
    batch = features.shape[0]
    if not split:
        return batch if features.device.type == "cpu" else max(batch, 64)
    if features.device.type != "cpu":
        return 64
    if pair_bytes is None:
        pair_bytes = 2 * features[0].numel() * features.element_size()
    return max(1, min(8, (8 << 20) // max(1, pair_bytes)))


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
    N Monte Carlo dropout foreground maps per image, for any 2-channel segmentation network with dropout.

    The N·B (sample, image) pairs are ordered sample-major (pair ``n·B + b`` is sample n of image b) and run
    through the network at most ``chunk_size`` at a time. Where :func:`encoder_split` finds a split, its
    deterministic ``encode`` runs once on the B images, its output is gathered for each chunk's pairs and only
    ``decode`` runs per chunk: per image ``encode + N·decode`` instead of ``N·(encode + decode)``. Otherwise each
    chunk is a full forward pass on the chunk's images. ``chunk_size`` bounds the activation memory (about
    ``chunk_size`` passes at once). On a GPU larger chunks are faster; on a CPU with glibc's default malloc, blocks
    over 32 MB are mapped afresh on every allocation, so at 224 px full width ``chunk_size=1`` is fastest unless
    ``MALLOC_MMAP_THRESHOLD_`` is raised (``benchmarks/mc_pass.py``).

    The pass changes nothing in the model: it runs under ``torch.inference_mode()`` (no graph, no ``.grad``)
    inside :func:`~scripts.networks.mc_dropout` (only the dropout layers sample; BatchNorm, InstanceNorm and
    stochastic depth act as in eval mode; every module's train/eval mode is restored afterwards, also on error).
    On CUDA it runs under ``torch.autocast("cuda")``; the maps are returned in float32 either way.

    Random numbers: the dropout masks are drawn from the global torch generator of the images' device, one mask
    per dropout layer per call, so the draws depend on ``chunk_size``. This function neither seeds nor saves that
    generator: a caller that must keep the training's random stream unchanged wraps the whole pass in
    ``torch.random.fork_rng(devices=...)`` (and seeds inside it for reproducible maps). With ``chunk_size == B``
    the draws are exactly those of N successive ``network(images)`` calls (:func:`mc_foreground_samples_naive`),
    with or without the split.

    Args:
        network: any ``nn.Module`` mapping ``(B, C, H, W)`` to ``(B, 2, H, W)`` logits with at least one dropout
            layer (:func:`check_mc_network` checks this before a run); a ``DataParallel`` /
            ``DistributedDataParallel`` wrapper is unwrapped (its ``.module`` is used, without the wrapper's
            cross-process buffer sync).
        images: ``(B, C, H, W)`` on the network's device.
        num_samples: N >= 1, stochastic passes per image.
        chunk_size: at most this many (sample, image) pairs per network call, >= 1, or ``"auto"``
            (:func:`auto_chunk_size`; on a CPU with a split, the first sample of the B images runs in one call, and
            the decoder's largest tensor, measured there, sizes the chunks of the other samples).

    Returns:
        ``(N, B, H, W)`` float32 foreground probabilities (softmax over channels, channel 1); an ordinary tensor
        (not an inference tensor), with ``requires_grad=False``.

    Raises:
        ValueError: When an argument is invalid, the network has no dropout layer, or its output is not
            ``(batch, 2, H, W)``.
    """
    _check_common(network, images, num_samples)
    check_chunk_size(chunk_size)
    net = _unwrap(network)
    split = encoder_split(net)
    b, _, h, w = images.shape
    pairs = num_samples * b
    # Allocated outside inference mode so that callers get an ordinary tensor they may modify in place;
    # writing into it from inference mode is allowed.
    out = torch.empty(pairs, h, w, dtype=torch.float32, device=images.device)
    with mc_dropout(net), torch.inference_mode(), _autocast(images):
        if split is not None:
            encode, run = split
            feats = encode(images)
        else:
            feats, run = [images], lambda chunk: net(chunk[0])
        first, pair_bytes = 0, None
        if chunk_size == "auto":
            if split is not None and images.device.type == "cpu" and pairs > b:
                # the first sample of the B images in one call (a training batch, which fits), its largest
                # activation measured: the other pairs go in chunks sized by that tensor's share of one pair
                with _largest_activation(net) as largest:
                    out[:b] = _foreground(run(feats), (b, 2, h, w))
                first, pair_bytes = b, largest[0] // b
            chunk_size = auto_chunk_size(feats[0], split is not None, pair_bytes)
        for start in range(first, pairs, chunk_size):
            stop = min(start + chunk_size, pairs)
            # Pair i is image i % B: a gather of only this chunk's pairs, so memory stays bounded by chunk_size
            # (expanding all N·B copies first would materialise them).
            idx = torch.arange(start, stop, device=images.device) % b
            chunk = [f.index_select(0, idx) for f in feats]
            out[start:stop] = _foreground(run(chunk), (stop - start, 2, h, w))
    return out.view(num_samples, b, h, w)


def mc_foreground_samples_naive(network: nn.Module, images: torch.Tensor, num_samples: int) -> torch.Tensor:
    """
    The reference MC pass: ``num_samples`` full ``network(images)`` forward passes, one after another.

    Same handling as :func:`mc_foreground_samples` (wrapper unwrapped, ``mc_dropout``, ``inference_mode``,
    autocast on CUDA, global random stream neither seeded nor saved), same output: ``(N, B, H, W)`` float32
    foreground probabilities.
    """
    _check_common(network, images, num_samples)
    net = _unwrap(network)
    b, _, h, w = images.shape
    out = torch.empty(num_samples, b, h, w, dtype=torch.float32, device=images.device)
    with mc_dropout(net), torch.inference_mode(), _autocast(images):
        for n in range(num_samples):
            out[n] = _foreground(net(images), (b, 2, h, w))
    return out


# stochastic depth by its usual class names (MONAI's and timm's DropPath, torchvision's StochasticDepth): it drops
# whole residual branches, and mc_dropout leaves it in eval mode
_STOCHASTIC_DEPTH = ("DropPath", "StochasticDepth", "DropConnect", "DropBlock")


def _what_to_set(net: nn.Module) -> str:
    argument = dropout_argument(type(net))
    if argument is None:
        return f"{type(net).__name__} has no dropout argument, so add a torch.nn.Dropout layer to it"
    return (f"set its argument {argument} > 0 (the bundle's --dropout, which its overlay in configs/network/ maps "
            f"to {argument})")


def check_mc_network(network: nn.Module, image_size, in_channels: int = 3, mc: bool = True) -> nn.Module:
    """
    Check, before a run relies on it, that ``network`` gives Monte Carlo dropout samples that mean something,
    and return it. Each failure is an :class:`InputError` of one sentence naming the class and what to set:

    - the output of a ``(1, in_channels, *image_size)`` input is not one ``(1, 2, H, W)`` tensor (a list, as
      ``BasicUNetPlusPlus`` returns, is refused: the bundle does not guess which of its outputs to use);
    - two eval-mode passes differ (dropout active in eval mode, e.g. ``F.dropout(x, training=True)``);

    and with ``mc`` (the difficulty pass or MC inference will run):

    - no dropout module with p > 0 (stochastic depth alone, ``DropPath``, is named as such: it is not sampled);
    - no dropout module with p > 0 runs in ``forward`` (seen with forward hooks);
    - two passes in sampling mode are identical (dropout applied functionally, out of the sampler's reach);
    - a pass in sampling mode changes a buffer (BatchNorm's running statistics must stay bit-identical);
    - a split found by :func:`encoder_split` differs from the full forward pass (same seed, exactly).

    Element-wise ``nn.Dropout`` right before the last layer with parameters (the output layer) is warned about
    once: each pixel's logit then gets independent noise, which makes the maps speckled rather than spatially
    coherent (the thesis U-Net, :class:`~scripts.networks.DropoutUNet`, is built this way).

    The passes run on a fixed random input under ``torch.random.fork_rng`` and ``torch.inference_mode``: the
    training's random stream, the weights, the buffers and every module's mode are as they were.
    """
    net = _unwrap(network)
    name = type(net).__name__
    size = spatial_size(image_size)  # the readers' axis order, as the network sees the images
    device = next(net.parameters(), torch.empty(0)).device
    x = torch.rand(1, in_channels, *size, generator=torch.Generator().manual_seed(0)).to(device)
    expected = (1, 2, *size)
    dropouts = {n: m for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0}
    if mc and not dropouts:
        depth = sorted({type(m).__name__ for m in net.modules() if type(m).__name__ in _STOCHASTIC_DEPTH})
        if depth:
            raise InputError(f"{name} has stochastic depth ({', '.join(depth)}) but no dropout with p > 0, and "
                             f"Monte Carlo dropout samples dropout only: {_what_to_set(net)}.")
        raise InputError(f"{name} has no dropout layer with p > 0, which Monte Carlo dropout needs: "
                         f"{_what_to_set(net)}.")
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    modes = {m: m.training for m in net.modules()}
    fired, calls = set(), []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: fired.add(n)) for n, m in dropouts.items()]
    hooks += [m.register_forward_hook(lambda m, i, o: calls.append(m))
              for m in net.modules() if not any(True for _ in m.children())]
    forks = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forks), torch.inference_mode(), _autocast(x):
            net.eval()
            passes = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                passes.append(_forward(net, x))
                if seed == 1:
                    _check_output(name, passes[0], expected, in_channels)
                    leaves = list(calls)
            if not torch.allclose(passes[0].float(), passes[1].float(), rtol=1e-4, atol=1e-5):
                raise InputError(f"{name} gives two different outputs for one input in eval mode, so dropout "
                                 "runs outside the sampler's control (e.g. F.dropout(x, training=True)): use "
                                 "torch.nn.Dropout modules, which eval mode switches off.")
            if not mc:
                return network
            fired.clear()
            samples = []
            with mc_dropout(net):
                for seed in (1, 2):
                    torch.manual_seed(seed)
                    samples.append(net(x))
                split = encoder_split(net)
                if split is not None:
                    torch.manual_seed(1)
                    parted = split[1](split[0](x))
        if not fired:
            raise InputError(f"{name}'s dropout layers ({', '.join(sorted(dropouts)[:3])}"
                             f"{', ...' if len(dropouts) > 3 else ''}) never run in its forward, so Monte Carlo "
                             f"dropout would sample nothing: {_what_to_set(net)} on layers that forward uses.")
        if torch.equal(samples[0], samples[1]):
            raise InputError(f"{name} gives identical outputs in two Monte Carlo dropout passes although it has "
                             "dropout with p > 0, so its dropout is not the modules the sampler switches on: use "
                             "torch.nn.Dropout modules in forward (not F.dropout with a fixed training flag).")
        changed = [k for k, v in net.named_buffers() if k in buffers and not torch.equal(v, buffers[k])]
        if changed:
            raise InputError(f"a Monte Carlo dropout pass of {name} changed its buffers ({', '.join(changed[:3])}), "
                             "which must stay as trained: its normalisation layers must use their running "
                             "statistics in eval mode (BatchNorm with track_running_stats=True, InstanceNorm).")
        # exact on a CPU; on a GPU the two paths may round differently (kernels chosen per call)
        same = torch.equal if device.type == "cpu" else lambda a, b: torch.allclose(a.float(), b.float(), 1e-3, 1e-4)
        if split is not None and not same(parted, samples[0]):
            raise InputError(f"{name}'s encode/decode split differs from its forward pass with the same dropout "
                             "draws: encode must hold no dropout and decode(encode(x)) must equal forward(x).")
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in modes.items():
            m.training = mode
    _warn_dropout_before_output(name, leaves)
    return network


def _forward(net: nn.Module, x: torch.Tensor):
    try:
        return net(x)
    except (RuntimeError, ValueError) as e:  # shapes the network cannot take: it names them, in its own words
        raise InputError(f"{type(net).__name__} fails on an input of shape {tuple(x.shape)} "
                         f"({str(e).strip().splitlines()[0][:200]}): check --image_size against the network's "
                         "downsampling (and its in_channels: the bundle feeds RGB).") from e


def _check_output(name: str, output, expected: tuple[int, ...], in_channels: int) -> None:
    if isinstance(output, (list, tuple)):
        raise InputError(f"{name} returns a {type(output).__name__} of {len(output)} outputs, not one (B, 2, H, W) "
                         "tensor (BasicUNetPlusPlus returns a list even without deep supervision), and the bundle "
                         "does not choose among them: wrap it in a module whose forward returns its final output.")
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        found = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise InputError(f"{name} maps an input of shape {expected[:1] + (in_channels,) + expected[2:]} to {found}, "
                         f"but the bundle needs {expected} background/foreground logits: set its output channels to "
                         "2 and check that --image_size is divisible by its total downsampling.")


def _warn_dropout_before_output(name: str, leaves: list[nn.Module]) -> None:
    with_params = [i for i, m in enumerate(leaves) if any(True for _ in m.parameters(recurse=False))]
    if not with_params or with_params[-1] == 0:
        return
    before = leaves[with_params[-1] - 1]
    if type(before) in (nn.Dropout, nn.AlphaDropout) and before.p > 0:
        warnings.warn(f"{name} applies element-wise dropout directly before its output layer, so each pixel's logit "
                      "gets independent noise in every Monte Carlo sample: its uncertainty maps are speckled "
                      "rather than spatially coherent.", stacklevel=3)


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
