# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""The U-Net of the thesis (method.md §6), built from MONAI's BasicUNet blocks, with MC-dropout support."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from monai.networks.nets.basic_unet import Down, TwoConv, UpCat
from torch import nn

from scripts.errors import InputError, is_int

__all__ = ["DropoutUNet", "mc_dropout"]


class DropoutUNet(nn.Module):
    """
    Ronneberger U-Net with bilinear upsampling (thesis Table 1) and dropout after the last encoder block
    and after the last decoder block, for Monte Carlo dropout.

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
        dropout: dropout probability p of the two dropout layers, in [0, 1).

    Input ``(B, in_channels, H, W)`` with H and W multiples of 16 for exact shapes (other sizes are padded
    in the decoder); output ``(B, out_channels, H, W)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256, 512, 512),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if not isinstance(features, Sequence) or len(features) != 5 or not all(is_int(f, 1) for f in features):
            raise InputError(f'--features must be a list of five positive integers, e.g. "[64,128,256,512,512]", '
                             f"got {features!r} ({type(features).__name__}).")
        features = tuple(int(f) for f in features)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise InputError(f"--dropout must be a number in [0.0, 1.0), got {dropout!r} ({type(dropout).__name__}).")
        f0, f1, f2, f3, f4 = features
        spatial_dims = 2
        conv = {"act": "relu", "norm": "batch", "bias": False, "dropout": None}  # None: no identity Dropout(0)
        up = {"upsample": "nontrainable", "pre_conv": None, "interp_mode": "bilinear", "align_corners": True}
        self.features = features
        self.inc = TwoConv(spatial_dims, in_channels, f0, **conv)
        self.down1 = Down(spatial_dims, f0, f1, **conv)
        self.down2 = Down(spatial_dims, f1, f2, **conv)
        self.down3 = Down(spatial_dims, f2, f3, **conv)
        self.down4 = Down(spatial_dims, f3, f4, **conv)
        self.dropout_enc = nn.Dropout(dropout)
        self.up1 = UpCat(spatial_dims, f4, f3, f2, **conv, **up)
        self.up2 = UpCat(spatial_dims, f2, f2, f1, **conv, **up)
        self.up3 = UpCat(spatial_dims, f1, f1, f0, **conv, **up)
        self.up4 = UpCat(spatial_dims, f0, f0, f0, **conv, **up)
        self.dropout_dec = nn.Dropout(dropout)
        self.outc = nn.Conv2d(f0, out_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The deterministic part: ``[x1, x2, x3, x4, x5]``, the skip connections and the bottleneck."""
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        return [x1, x2, x3, x4, x5]

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The stochastic part, from the first dropout layer to the logits."""
        x1, x2, x3, x4, x5 = feats
        u = self.up1(self.dropout_enc(x5), x4)
        u = self.up2(u, x3)
        u = self.up3(u, x2)
        u = self.up4(u, x1)
        return self.outc(self.dropout_dec(u))

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
