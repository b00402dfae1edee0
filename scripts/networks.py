# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The U-Net of the thesis (method.md §6) and a full-resolution U-Net for thin structures (tubular.md §3), both
built from MONAI's BasicUNet blocks, with MC-dropout support, and the anisotropic-diffusion refiner that continues
either of them (tubular.md §4).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pydoc import locate

import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from scripts.diffusion import AnisotropicDiffusion, rk4
from scripts.errors import InputError, check_int, check_number, is_int

__all__ = ["DROPOUT_TYPES", "DROPOUT_PLACES", "DropoutUNet", "FullResolutionUNet", "DiffusionRefiner", "mc_dropout",
           "dropout_argument", "with_dropout"]


# the blocks of both networks: BasicUNet's, with dropout only where MC dropout samples (None: no identity Dropout(0))
_CONV = {"act": "relu", "norm": "batch", "bias": False, "dropout": None}
_UP = {"upsample": "nontrainable", "pre_conv": None, "interp_mode": "bilinear", "align_corners": True}


# element: each activation dropped on its own (the thesis); channel: whole feature maps (Dropout2d), so that a sample's
# perturbation is spatially coherent rather than independent per pixel (docs/results_difficulty.md)
DROPOUT_TYPES = {"element": nn.Dropout, "channel": nn.Dropout2d}
# bottleneck: after the last encoder block; output: on the last decoder features, before the 1×1 output conv
DROPOUT_PLACES = ("bottleneck", "output")


def _check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise InputError(f"--dropout must be a number in [0.0, 1.0), got {dropout!r} ({type(dropout).__name__}).")


def _dropout_layers(dropout: float, dropout_type: str, dropout_at: Sequence[str]) -> tuple[nn.Module, nn.Module]:
    """The two dropout slots of both networks, (bottleneck, output): a slot not in ``dropout_at`` is the identity."""
    _check_dropout(dropout)
    if dropout_type not in DROPOUT_TYPES:
        raise InputError(f"--dropout_type must be one of {', '.join(DROPOUT_TYPES)}, got {dropout_type!r}.")
    if (isinstance(dropout_at, str) or not isinstance(dropout_at, Sequence) or not dropout_at
            or not all(place in DROPOUT_PLACES for place in dropout_at)):
        raise InputError(f'--dropout_at must be a non-empty list of places among {", ".join(DROPOUT_PLACES)}, '
                         f'e.g. "[bottleneck,output]", got {dropout_at!r} ({type(dropout_at).__name__}).')
    layer = DROPOUT_TYPES[dropout_type]
    return tuple(layer(dropout) if place in dropout_at else nn.Identity() for place in DROPOUT_PLACES)


class DropoutUNet(nn.Module):
    """
    Ronneberger U-Net with bilinear upsampling (thesis Table 1) and dropout after the last encoder block
    (``bottleneck``) and after the last decoder block (``output``), for Monte Carlo dropout.

    With ``features = (f0, f1, f2, f3, f4)`` (Table 1: ``(64, 128, 256, 512, 512)``):

    ======================  ====================  =================================
    block                   output channels       spatial size (input H × W)
    ======================  ====================  =================================
    ``inc`` (DoubleConv)    f0                    H × W
    ``down1`` .. ``down4``  f1, f2, f3, f4        H/2 .. H/16
    ``dropout_enc``         f4                    H/16
    ``up1`` .. ``up4``      f2, f1, f0, f0        H/8 .. H
    ``dropout_dec``         f0                    H
    ``outc`` (1×1 conv)     out_channels          H × W
    ======================  ====================  =================================

    DoubleConv is (3×3 conv, BatchNorm, ReLU) × 2; each up block upsamples bilinearly ×2 and concatenates
    the encoder output of the same resolution.

    Everything before ``dropout_enc`` is deterministic, so :meth:`encode` can be run once per image and
    :meth:`decode` N times for N Monte Carlo samples; ``forward(x) == decode(encode(x))``.

    Args:
        in_channels: input channels (3 for RGB colonoscopy frames).
        out_channels: output channels (2: background and polyp logits).
        features: the five encoder widths ``(f0, f1, f2, f3, f4)``.
        dropout: dropout probability p of the dropout layers, in [0, 1).
        dropout_type: ``"element"`` (``nn.Dropout``, the thesis) or ``"channel"`` (``nn.Dropout2d``: a sample
            drops whole feature maps).
        dropout_at: the places with dropout, among ``"bottleneck"`` and ``"output"`` (the thesis: both); the
            other is the identity.

    Input ``(B, in_channels, H, W)`` with H and W multiples of 16 for exact shapes (other sizes are padded
    in the decoder); output ``(B, out_channels, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256, 512, 512),
        dropout: float = 0.5,
        dropout_type: str = "element",
        dropout_at: Sequence[str] = DROPOUT_PLACES,
    ) -> None:
        super().__init__()
        if not isinstance(features, Sequence) or len(features) != 5 or not all(is_int(f, 1) for f in features):
            raise InputError(f'--features must be a list of five positive integers, e.g. "[64,128,256,512,512]", '
                             f"got {features!r} ({type(features).__name__}).")
        features = tuple(int(f) for f in features)
        self.dropout_enc, self.dropout_dec = _dropout_layers(dropout, dropout_type, dropout_at)
        f0, f1, f2, f3, f4 = features
        spatial_dims = 2
        self.features = features
        self.inc = TwoConv(spatial_dims, in_channels, f0, **_CONV)
        self.down1 = Down(spatial_dims, f0, f1, **_CONV)
        self.down2 = Down(spatial_dims, f1, f2, **_CONV)
        self.down3 = Down(spatial_dims, f2, f3, **_CONV)
        self.down4 = Down(spatial_dims, f3, f4, **_CONV)
        self.up1 = UpCat(spatial_dims, f4, f3, f2, **_CONV, **_UP)
        self.up2 = UpCat(spatial_dims, f2, f2, f1, **_CONV, **_UP)
        self.up3 = UpCat(spatial_dims, f1, f1, f0, **_CONV, **_UP)
        self.up4 = UpCat(spatial_dims, f0, f0, f0, **_CONV, **_UP)
        self.outc = nn.Conv2d(f0, out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The deterministic part: ``[x1, x2, x3, x4, x5]``, the skip connections and the bottleneck."""
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        return [x1, x2, x3, x4, x5]

    def decode_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """
        The stochastic part up to the last decoder feature map F, ``(B, f0, H, W)``, exactly as the 1×1 conv
        ``outc`` reads it: ``decode(feats) == outc(decode_features(feats))``; in eval mode, where dropout is the
        identity, the output of ``up4``. For a later stage that needs F with the logits (one dropout draw for both).
        """
        x1, x2, x3, x4, x5 = feats
        u = self.up1(self.dropout_enc(x5), x4)
        u = self.up2(u, x3)
        u = self.up3(u, x2)
        u = self.up4(u, x1)
        return self.dropout_dec(u)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The stochastic part, from the first dropout layer to the logits."""
        # one return type (not a return_features flag): TorchScript export (ckpt_export) compiles this method
        return self.outc(self.decode_features(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _pool_to(z: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The full-resolution stream ``z`` max-pooled to ``size``, the spatial size of one scale's feature maps."""
    h, w, sh, sw = z.shape[-2], z.shape[-1], size[0], size[1]
    if h == sh and w == sw:
        return z
    if h % sh == 0 and w % sw == 0 and h // sh == w // sw:
        # sizes that are multiples of 2^s: the windows of the U-Net's s successive 2×2 max poolings, in one call
        return F.max_pool2d(z, h // sh)
    # other sizes: the U-Net's poolings drop an odd last row/column; windows that cover the whole stream keep its
    # edge pixels (a thin vessel may run along it), at the price of windows up to one pixel larger
    return F.adaptive_max_pool2d(z, [sh, sw])


def _up_to(y: torch.Tensor, size: list[int]) -> torch.Tensor:
    """``y`` upsampled bilinearly to ``size``; pixel-centre aligned (``align_corners=False``), so that each coarse
    value lands on the block of full-resolution pixels it was pooled from."""
    return F.interpolate(y, size=size, mode="bilinear", align_corners=False)


class FullResolutionUNet(nn.Module):
    """
    A U-Net whose skips are joined by a full-resolution residual stream, with dropout where :class:`DropoutUNet`
    has it, for Monte Carlo dropout: the thin-structure network of tubular.md §3 (seed 004's skip design; the role
    FR-UNet plays in seed 003).

    Two streams run through the network, as in the full-resolution residual units (FRRU) of FRRN (Pohlen et al.,
    "Full-Resolution Residual Networks for Semantic Segmentation in Street Scenes", CVPR 2017): the *pooling
    stream* is an ordinary U-Net of MONAI ``Down``/``UpCat`` blocks with bilinear upsampling and skip
    connections, and the *residual stream* ``z``, f0 channels, stays at the input's resolution throughout. Every
    block at a scale s >= 1, in the encoder and in the decoder, reads ``z`` max-pooled to its scale, concatenated
    with its usual input, and writes back into it: its output, mapped to f0 channels by a 1×1 conv and upsampled
    bilinearly to full size, is *added* to ``z``. Each scale thus reads what all the scales computed before it
    left in the stream, and the last decoder block, ``up_full``, which concatenates ``z`` with its skip and the
    upsampled decoder features, receives every scale's contribution on the input's pixel grid, where
    one-pixel-wide vessels live, and not only through the chain of ×2 upsamplings. (FR-UNet, Liu et al. 2022,
    reaches the same goal with HRNet-like parallel branches; this class keeps the U-Net of the polyp method and
    adds FRRN's stream to it.)

    With ``features = (f0, f1, ..., fd)``, depth d = ``len(features) - 1`` (default ``(32, 64, 128, 256)``, d = 3),
    an input of H × W pixels (the size column gives H; W alike), the encoder outputs ``x_0`` (full resolution) and
    ``y_1 .. y_d`` (``y_d`` the bottleneck), the decoder outputs ``u_{d-1} .. u_0``, k = 0 .. d-2:

    ============================  ===============================================  =================  =====
    block                         reads                                            output             size
    ============================  ===============================================  =================  =====
    ``inc`` (TwoConv)             the image                                        x_0 (f0); z = x_0  H
    ``down[0]`` (Down)            x_0 (the stream is still x_0 there)              y_1 (f1)           H/2
    ``down[s-1]`` (Down), s >= 2  [y_{s-1}, z pooled to y_{s-1}'s size]            y_s (f_s)          H/2^s
    ``down_to_stream[s-1]``       y_s, s < d                                       f0, added to z     H
    ``dropout_enc``               y_d, the bottleneck                              f_d                H/2^d
    ``down_to_stream[d-1]``       the dropped y_d                                  f0, added to z     H
    ``up[k]`` (UpCat), s = d-1-k  u_{s+1} (dropped y_d at k = 0), [y_s, z pooled]  u_s (f_s)          H/2^s
    ``up_to_stream[k]``           u_s                                              f0, added to z     H
    ``up_full`` (UpCat)           u_1 (dropped y_1 if d = 1), [x_0, z]             u_0 (f0)           H
    ``dropout_dec``               u_0                                              F (f0)             H
    ``outc`` (1×1 conv)           F                                                out_channels       H
    ============================  ===============================================  =================  =====

    TwoConv is (3×3 conv, BatchNorm, ReLU) × 2, as in :class:`DropoutUNet`; ``Down`` max-pools its input ×2
    first, so the stream it reads is in effect pooled to its own scale; each ``UpCat`` upsamples bilinearly ×2 and
    concatenates its skip with the stream pooled to the skip's size. The ``*_to_stream`` 1×1 convs have a bias and
    no normalisation or activation: the stream is a plain sum of ``x_0`` and the scales' contributions (FRRN's
    residual stream), and every convolution that reads it is followed by BatchNorm.

    Dropout and the :meth:`encode`/:meth:`decode` split: ``dropout_enc`` sits on the bottleneck ``y_d`` and
    ``dropout_dec`` on the tensor ``outc`` reads, as in :class:`DropoutUNet`. Everything before ``dropout_enc`` is
    deterministic, so :meth:`encode` (all encoder convolutions) runs once per image and :meth:`decode` N times for N
    Monte Carlo samples; ``forward(x) == decode(encode(x))``. ``dropout_enc`` acts on ``y_d`` *before both* of its
    consumers, the decoder and ``down_to_stream[d-1]`` (the bottleneck's write into ``z``), so that, as in the polyp
    U-Net where dropout follows the whole of ``down4``, no information leaves the bottleneck undropped. Moving that
    write into :meth:`encode` (computed from the undropped ``y_d``) would save each sample only one 1×1 conv at
    H/2^d and one upsampling and addition at full size, and would carry the deepest features to the last block
    around the dropout, so the samples would vary less; a dropout any earlier would put encoder convolutions into
    every sample.
    ``dropout_dec`` makes every path to the output stochastic, the skips and the residual stream included.

    The last decoder feature map F (what ``outc`` reads; in eval mode, where dropout is the identity, ``u_0``) is
    ``decode_features(encode(x))``, and the logits of the same pass are ``outc(F)``: the refinement stage of
    tubular.md §4 needs both. (A ``return_features`` flag on :meth:`decode` would give it two return types, which
    TorchScript cannot compile; the class scripts, for the bundle's ``ckpt_export``.)

    Args:
        in_channels: input channels (3 for RGB fundus images).
        out_channels: output channels (2: background and vessel logits).
        features: the widths ``(f0, f1, ..., fd)`` of the full-resolution scale and of each scale below it, at
            least two; f0 is also the width of the residual stream.
        dropout: dropout probability p of the dropout layers, in [0, 1).
        dropout_type, dropout_at: the kind of dropout and its places, as in :class:`DropoutUNet`.

    Input ``(B, in_channels, H, W)`` with H, W >= 2^d; output ``(B, out_channels, H, W)`` logits. With H and W
    multiples of 2^d every scale is exactly H/2^s and the stream is pooled with the U-Net's own windows; other
    sizes work as in :class:`DropoutUNet` (the poolings drop an odd last row or column and ``UpCat`` pads it back)
    and the stream is pooled adaptively to each scale's size and upsampled to exactly H × W.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.5,
        dropout_type: str = "element",
        dropout_at: Sequence[str] = DROPOUT_PLACES,
    ) -> None:
        super().__init__()
        if not isinstance(features, Sequence) or len(features) < 2 or not all(is_int(f, 1) for f in features):
            raise InputError(f"--features must be a list of at least two positive integers, the widths of the "
                             f'full-resolution scale and of each scale below it, e.g. "[32,64,128,256]", '
                             f"got {features!r} ({type(features).__name__}).")
        self.dropout_enc, self.dropout_dec = _dropout_layers(dropout, dropout_type, dropout_at)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not is_int(value, 1):
                raise InputError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__}).")
        f = tuple(int(v) for v in features)
        depth = len(f) - 1
        spatial_dims = 2
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.features = f
        c = f[0]  # the residual stream's width
        self.inc = TwoConv(spatial_dims, self.in_channels, c, **_CONV)
        # down[0] reads x_0 alone: the stream is x_0 itself until the first scale writes into it
        self.down = nn.ModuleList(
            Down(spatial_dims, f[s - 1] + (c if s > 1 else 0), f[s], **_CONV) for s in range(1, depth + 1)
        )
        self.down_to_stream = nn.ModuleList(nn.Conv2d(f[s], c, kernel_size=1) for s in range(1, depth + 1))
        self.up = nn.ModuleList(UpCat(spatial_dims, f[s + 1], f[s] + c, f[s], **_CONV, **_UP)
                                for s in reversed(range(1, depth)))
        self.up_to_stream = nn.ModuleList(nn.Conv2d(f[s], c, kernel_size=1) for s in reversed(range(1, depth)))
        # scale 0 on its own, not as up[-1]: it only reads the stream, and TorchScript can zip whole ModuleLists only
        self.up_full = UpCat(spatial_dims, f[1], f[0] + c, f[0], **_CONV, **_UP)
        self.outc = nn.Conv2d(c, self.out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """
        The deterministic part: ``[x_0, y_1, ..., y_{d-1}, y_d, z]``, the skips (full resolution first), the
        bottleneck ``y_d`` (not yet dropped out) and the residual stream ``z`` after the writes of scales 1 .. d-1.
        """
        depth = len(self.down)
        min_size = 1 << depth  # 2^d; `2**d` is a float in TorchScript
        if x.dim() != 4 or x.shape[-2] < min_size or x.shape[-1] < min_size:
            raise ValueError(f"FullResolutionUNet with {depth + 1} features needs input (B, C, H, W) with "
                             f"H, W >= {min_size}, got {list(x.shape)}.")
        x0 = self.inc(x)
        feats = [x0]
        z = x0
        # zip pairs the ModuleLists: TorchScript indexes a ModuleList only by a literal
        for s, (down, to_stream) in enumerate(zip(self.down, self.down_to_stream)):
            prev = feats[-1]
            y = down(prev if s == 0 else torch.cat([prev, _pool_to(z, prev.shape[-2:])], dim=1))
            feats.append(y)
            if s < depth - 1:  # the bottleneck writes into z in decode, after dropout_enc
                z = z + _up_to(to_stream(y), z.shape[-2:])
        feats.append(z)
        return feats

    def decode_features(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """
        The stochastic part, from ``dropout_enc`` up to the last decoder feature map F, ``(B, f0, H, W)``, exactly
        as the 1×1 conv ``outc`` reads it: ``decode(feats) == outc(decode_features(feats))``; in eval mode, where
        dropout is the identity, the output of ``up_full``.
        """
        depth = len(self.down)
        y, z = feats[depth], feats[depth + 1]
        u = self.dropout_enc(y)
        # out of place throughout: feats may be reused (the MC pass decodes copies of them, chunk after chunk)
        z = z + _up_to(self.down_to_stream[-1](u), z.shape[-2:])
        for k, (up, to_stream) in enumerate(zip(self.up, self.up_to_stream)):  # scales d-1 .. 1
            skip = feats[depth - 1 - k]
            u = up(u, torch.cat([skip, _pool_to(z, skip.shape[-2:])], dim=1))
            z = z + _up_to(to_stream(u), z.shape[-2:])
        u = self.up_full(u, torch.cat([feats[0], z], dim=1))
        return self.dropout_dec(u)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The stochastic part, from ``dropout_enc`` to the logits ``(B, out_channels, H, W)``."""
        # one return type (not a return_features flag): TorchScript export (ckpt_export) compiles this method
        return self.outc(self.decode_features(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half precision (autocast) to float32; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class DiffusionRefiner(nn.Module):
    """
    A trained backbone, frozen, followed by seed 003's anisotropic-diffusion refinement (tubular.md §4): a direction
    head reads the backbone's last decoder feature map and the backbone's foreground probability diffuses along the
    direction it estimates: meant to reconnect a vessel broken into fragments along its course, where DTI grows the
    mask in every direction (docs/results_vessels.md measures how far it does on CHASE_DB1).

    With F ``(B, f0, H, W)`` the feature map the backbone's ``outc`` reads and ``u₀ = softmax(outc(F))[:, 1]``:

        w = head(F)                     (one k×k convolution, f0 → 2 channels: the only trained parameters)
        v = w / |w|                     (per pixel, the unit vessel direction (v_x, v_y))
        ∂u/∂t = ReLU(∇·(D ∇u)),  D = λ∥ v vᵀ + λ⊥ (I − v vᵀ),  u(0) = u₀
        u = N steps of RK4 with step Δt, clamped to [0, 1] after each (scripts.diffusion.rk4)

    The output is ``(B, 2, H, W)``, the shape of the backbone's logits, holding the *log*-probabilities
    ``log [1 − u, u]`` (floored at ``log(min_probability)``): every consumer that applies a softmax to a backbone's
    logits (validation and evaluation postprocessing, :class:`~scripts.uncertainty.MCDropoutInferer`, the MC pass,
    MONAI's cross-entropy) reads the refined probabilities ``[1 − u, u]`` unchanged, and the cross-entropy of that
    softmax is the binary cross-entropy of ``u`` itself (seed 003's code applied ``binary_cross_entropy_with_logits``
    to probabilities instead, a bug).

    ``backbone_window``: a backbone trained on small patches segments best when it sees windows of that size (the
    vessel U-Net trained on 48-px patches: test Dice 0.71 in 48-px windows, 0.63 on whole CHASE_DB1 images), while
    the diffusion must see the whole input, with no seams to stop it. So F and the logits come from MONAI's
    ``SlidingWindowInferer`` over the input in ``backbone_window``-px windows (gaussian-weighted blending), and the
    head and the solver run once on the whole input. ``None``: the backbone sees the whole input.

    The backbone is frozen: its parameters do not require gradients and ``train()`` leaves it in eval mode, so
    BatchNorm keeps its statistics and dropout is off while the head trains. The fast MC-dropout pass calls
    :meth:`encode` once and :meth:`decode` per sample: each dropout sample of the backbone is refined on its own
    (with windows, the encoder is part of each sample's windows). The solver runs in float32 outside autocast:
    under mixed precision the backbone and the head run in half precision, the time stepping not.

    Args:
        backbone: a trained :class:`DropoutUNet` or :class:`FullResolutionUNet` (any network with ``encode``,
            ``decode_features`` and a 1×1 conv ``outc`` to 2 channels).
        direction_kernel: k, the head's kernel size, odd (seed 003 sweeps 1 .. 13; 9 is its best).
        steps: N, RK4 steps (seed 003: 10 .. 10⁴, best near 10²–10³).
        dt: Δt, the step (seed 003: 0.1); the diffusion reaches about ``sqrt(2 λ∥ N Δt)`` pixels along ``v``.
        order: accuracy of the central differences: 2, 4, 6 or 8 (seed 003: 8).
        lambda_parallel, lambda_perp: λ∥, λ⊥ (seed 003: 1 and 0).
        backbone_window: the side of the backbone's windows (its training patch size), or None.
        window_batch_size: backbone windows per call.
        checkpoint_steps: when gradients are recorded, recompute each step in the backward pass instead of keeping
            its intermediates (about 50 maps the size of ``u`` per step): what lets the head train through hundreds
            of steps on large crops.
        min_probability: the floor of both probabilities before the log (a clamped ``u`` of exactly 0 or 1 would
            give −inf).

    Input ``(B, C, H, W)`` as the backbone's; output ``(B, 2, H, W)`` log-probabilities, float32 (float64 for a
    float64 backbone).
    """

    def __init__(self, backbone: nn.Module, direction_kernel: int = 9, steps: int = 100, dt: float = 0.1,
                 order: int = 8, lambda_parallel: float = 1.0, lambda_perp: float = 0.0,
                 backbone_window: int | None = None, window_batch_size: int = 64, checkpoint_steps: bool = True,
                 min_probability: float = 1e-6) -> None:
        super().__init__()
        outc = getattr(backbone, "outc", None)
        if not (callable(getattr(backbone, "encode", None)) and callable(getattr(backbone, "decode_features", None))
                and isinstance(outc, nn.Conv2d) and outc.out_channels == 2):
            raise InputError(f"the refiner's backbone must be a DropoutUNet or FullResolutionUNet (encode, "
                             f"decode_features and a 2-channel outc), got {type(backbone).__name__}.")
        if not is_int(direction_kernel, 1) or direction_kernel % 2 == 0:
            raise InputError(f"--direction_kernel must be an odd integer >= 1 (seed 003 sweeps 1 .. 13), got "
                             f"{direction_kernel!r} ({type(direction_kernel).__name__}).")
        steps = check_int(steps, "--diffusion_steps", 0)
        check_int(window_batch_size, "--backbone_window_batch", 1)
        if backbone_window is not None and not is_int(backbone_window, 1):
            raise InputError(f"--backbone_window must be a positive integer (the backbone's training patch size) or "
                             f"null, got {backbone_window!r} ({type(backbone_window).__name__}).")
        self.backbone = backbone.requires_grad_(False).eval()
        self.backbone_class = type(backbone).__name__  # in the run's identity: a refiner is only its backbone's
        self.direction_kernel = int(direction_kernel)
        self.steps = steps
        self.dt = check_number(dt, "--diffusion_dt", 0.0)
        self.backbone_window = backbone_window
        self.checkpoint_steps = bool(checkpoint_steps)
        self.min_probability = check_number(min_probability, "min_probability", 0.0, 0.5)
        self.head = nn.Conv2d(outc.in_channels, 2, kernel_size=self.direction_kernel,
                              padding=self.direction_kernel // 2)
        self.diffusion = AnisotropicDiffusion(order, lambda_parallel, lambda_perp)
        self._windows = None if backbone_window is None else SlidingWindowInferer(
            roi_size=(backbone_window, backbone_window), sw_batch_size=window_batch_size, overlap=0.25,
            mode="gaussian")

    def train(self, mode: bool = True) -> DiffusionRefiner:
        super().train(mode)
        self.backbone.eval()  # frozen: no BatchNorm updates, no dropout while the head trains
        return self

    def direction(self, features: torch.Tensor) -> torch.Tensor:
        """The unit direction field ``v`` ``(B, 2, H, W)``, at least float32, from F ``(B, f0, H, W)``."""
        w = _at_least_float32(self.head(features))
        return w * torch.rsqrt(w.square().sum(dim=1, keepdim=True) + 1e-12)

    def refine(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``u`` ``(B, 1, H, W)`` after ``steps`` RK4 steps of the diffusion along ``v`` ``(B, 2, H, W)``."""
        with torch.autocast(u.device.type, enabled=False):
            return rk4(lambda x: self.diffusion(x, v), _at_least_float32(u), self.dt, self.steps,
                       checkpoint_steps=self.checkpoint_steps)

    def _features_and_logits(self, feats: list[torch.Tensor]) -> torch.Tensor:
        features = self.backbone.decode_features(feats)
        return torch.cat([features, self.backbone.outc(features)], dim=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The deterministic part: the backbone's encoder (see :meth:`DropoutUNet.encode`); with backbone windows,
        the input itself (each window's encoder then runs within every decode)."""
        return [x] if self._windows is not None else self.backbone.encode(x)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The backbone's stochastic part, the head and the solver: log-probabilities ``(B, 2, H, W)``."""
        if self._windows is None:
            z = self._features_and_logits(feats)
        else:
            z = self._windows(feats[0], lambda w: self._features_and_logits(self.backbone.encode(w)))
        features, logits = z[:, :-2], z[:, -2:]
        u = torch.softmax(_at_least_float32(logits), dim=1)[:, 1:2]
        u = self.refine(u, self.direction(features))
        return torch.log(torch.cat([1.0 - u, u], dim=1).clamp_min(self.min_probability))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@contextmanager
def mc_dropout(model: nn.Module) -> Iterator[nn.Module]:
    """
    Put ``model`` in eval mode with only its dropout layers sampling, and restore every module's mode on exit.

    ``model.train()`` would also put BatchNorm in training mode, and a forward pass would then overwrite the
    running statistics of the model being trained; here BatchNorm keeps using (and keeping) its statistics.
    """
    modes = {m: m.training for m in model.modules()}
    dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise ValueError(f"{type(model).__name__} has no dropout layer: Monte Carlo dropout needs at least one.")
    try:
        model.eval()
        for m in dropouts:
            m.train()
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def dropout_argument(cls: type) -> str | None:
    """The argument of ``cls`` that sets its dropout probability (``dropout``, ``dropout_prob``, ``drop_rate``,
    ...), found by name; None when it has none. Attention dropout and stochastic depth (``attn_drop_rate``,
    ``dropout_path_rate``) are not it."""
    try:
        names = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return None
    other = ("path", "attn", "attention", "connect", "block", "layer")
    return next((n for n in names if "drop" in n.lower() and not any(o in n.lower() for o in other)), None)


def with_dropout(network: str | type, dropout: float, **kwargs) -> nn.Module:
    """
    ``network(**kwargs)`` with ``dropout`` passed as the class's own dropout argument (:func:`dropout_argument`):
    ``dropout_prob`` for MONAI's ``SegResNet``, ``drop_rate`` for ``SwinUNETR``.

    For the overlays of classes whose argument is not called ``dropout``: MONAI Label's ``monaibundle`` app sets
    ``network_def#dropout`` (its ``epistemic_dropout``) on whatever network a bundle declares, which such a class
    would refuse as an unexpected argument. The network returned is the class's own instance, unchanged.

    Args:
        network: the class, or its dotted path (``monai.networks.nets.SegResNet``).
        dropout: the dropout probability, in [0, 1).
        kwargs: the class's other arguments.
    """
    cls = locate(network) if isinstance(network, str) else network
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise InputError(f"network_def#network must name a torch.nn.Module class, got {network!r}.")
    _check_dropout(dropout)
    argument = dropout_argument(cls)
    if argument is None:
        raise InputError(f"{cls.__name__} has no dropout argument for network_def#dropout: give its network_def "
                         "without scripts.networks.with_dropout, with dropout layers of its own.")
    return cls(**kwargs, **{argument: dropout})
