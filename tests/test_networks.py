"""The Table 1 U-Net and the MC-dropout switch."""

from __future__ import annotations

import pytest
import torch
from scripts.networks import DropoutUNet, mc_dropout
from torch import nn


def test_table1_shapes_at_full_width():
    net = DropoutUNet().eval()
    x = torch.rand(1, 3, 224, 224)
    feats = net.encode(x)
    # inc, down1..down4 of method.md §6 (channels, size)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 224, 224), (128, 112, 112), (256, 56, 56),
                                                   (512, 28, 28), (512, 14, 14)]
    shapes = []
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
             for n in ("up1", "up2", "up3", "up4", "outc")]
    with torch.no_grad():
        out = net(x)
    for h in hooks:
        h.remove()
    assert shapes == [(256, 28, 28), (128, 56, 56), (64, 112, 112), (64, 224, 224), (2, 224, 224)]
    assert out.shape == (1, 2, 224, 224)


def test_dropout_sits_after_down4_and_up4_only():
    net = DropoutUNet(features=(4, 8, 8, 16, 16), dropout=0.3)
    dropouts = [(n, m.p) for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts == [("dropout_enc", 0.3), ("dropout_dec", 0.3)]


def test_forward_is_decode_of_encode_and_odd_sizes_work():
    net = DropoutUNet(features=(4, 8, 8, 16, 16)).eval()
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.decode(net.encode(x)))
        assert net(torch.rand(1, 3, 37, 50)).shape == (1, 2, 37, 50)


def test_mc_dropout_samples_without_touching_batchnorm_and_restores_modes():
    torch.manual_seed(0)
    net = DropoutUNet(features=(4, 8, 8, 16, 16), dropout=0.5)
    net.train()
    net(torch.rand(4, 3, 32, 32))  # give BatchNorm non-trivial running statistics
    net.down2.eval()  # a mixed state must come back exactly
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {n: m.training for n, m in net.named_modules()}
    x = torch.rand(2, 3, 32, 32)
    with mc_dropout(net), torch.no_grad():
        assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        a, b = net(x), net(x)
    assert not torch.equal(a, b), "dropout did not sample"
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed during MC sampling"
    assert {n: m.training for n, m in net.named_modules()} == modes
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))


def test_mc_dropout_needs_a_dropout_layer():
    with pytest.raises(ValueError, match="no dropout layer"):
        with mc_dropout(nn.Conv2d(1, 1, 1)):
            pass


@pytest.mark.parametrize("kwargs,match", [({"features": (4, 8, 8, 16)}, "five positive"),
                                          ({"dropout": 1.0}, r"--dropout must be a number in \[0.0, 1.0\)")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DropoutUNet(**kwargs)
