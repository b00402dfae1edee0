"""The Table 1 U-Net, the full-resolution U-Net for thin structures, and the MC-dropout switch."""

from __future__ import annotations

import io

import pytest
import torch
from monai.losses import DiceCELoss
from scripts.errors import InputError
from scripts.networks import DropoutUNet, FullResolutionUNet, mc_dropout
from scripts.resume import describe_network
from scripts.uncertainty import check_mc_network, mc_foreground_samples, mc_foreground_samples_naive
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


@pytest.mark.parametrize("cls,features", [(DropoutUNet, (4, 8, 8, 16, 16)), (FullResolutionUNet, (4, 8, 8))])
@pytest.mark.parametrize("dropout_type,layer", [("element", nn.Dropout), ("channel", nn.Dropout2d)])
@pytest.mark.parametrize("at", [("bottleneck", "output"), ("bottleneck",), ("output",)])
def test_dropout_variants_place_the_chosen_layer(cls, features, dropout_type, layer, at):
    net = cls(features=features, dropout=0.3, dropout_type=dropout_type, dropout_at=list(at))
    placed = {"bottleneck": net.dropout_enc, "output": net.dropout_dec}
    for place, module in placed.items():
        if place in at:
            assert type(module) is layer and module.p == 0.3
        else:
            assert isinstance(module, nn.Identity)
    check_mc_network(net, 32)  # samples, keeps BatchNorm, and the encode/decode split still holds


def test_channel_dropout_drops_whole_feature_maps():
    torch.manual_seed(0)
    net = DropoutUNet(features=(4, 8, 8, 16, 16), dropout=0.5, dropout_type="channel", dropout_at=["output"]).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = net.encode(x)
        kept = net.decode_features(feats).double()  # eval mode: no dropout
        with mc_dropout(net):
            dropped = net.decode_features(feats).double()
    # each (image, channel) map is either zero or the whole map scaled by 1 / (1 - p), by hand in float64
    for b in range(3):
        for c in range(kept.shape[1]):
            zero = bool((dropped[b, c] == 0).all())
            assert zero or torch.allclose(dropped[b, c], kept[b, c] * 2.0, rtol=1e-5, atol=1e-6), (b, c)
    zeros = (dropped.flatten(2) == 0).all(-1)
    assert 0 < int(zeros.sum()) < zeros.numel()  # some maps dropped, not all
    element = DropoutUNet(features=(4, 8, 8, 16, 16), dropout=0.5, dropout_at=["output"]).eval()
    element.load_state_dict(net.state_dict())  # the same weights: dropout layers hold no parameters
    with torch.no_grad(), mc_dropout(element):
        speckled = element.decode_features(element.encode(x))
    assert not (speckled.flatten(2) == 0).all(-1).any()  # element-wise: no map dropped whole at 32 x 32


@pytest.mark.parametrize("kwargs,match", [({"dropout_type": "spatial"}, "--dropout_type must be one of element, channel"),
                                          ({"dropout_at": "output"}, "--dropout_at must be a non-empty list"),
                                          ({"dropout_at": []}, "--dropout_at must be a non-empty list"),
                                          ({"dropout_at": ["decoder"]}, "among bottleneck, output")])
def test_bad_dropout_variants(kwargs, match):
    for cls, features in ((DropoutUNet, (4, 8, 8, 16, 16)), (FullResolutionUNet, (4, 8))):
        with pytest.raises(InputError, match=match):
            cls(features=features, **kwargs)


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


# ---------------------------------------------------------------- DropoutUNet's last decoder feature map


def test_dropout_unet_decode_features_is_the_map_outc_reads():
    torch.manual_seed(0)
    net = DropoutUNet(features=(4, 8, 8, 16, 16)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = net.encode(x)
        f = net.decode_features(feats)
        assert f.shape == (2, 4, 32, 32)
        assert torch.equal(net.outc(f), net.decode(feats)) and torch.equal(net.outc(f), net(x))
        assert torch.equal(f, net.up4(net.up3(net.up2(net.up1(feats[4], feats[3]), feats[2]), feats[1]), feats[0]))
        with mc_dropout(net):  # one dropout draw gives F and, through outc, the logits of the same sample
            torch.manual_seed(3)
            f = net.decode_features(feats)
            torch.manual_seed(3)
            assert torch.equal(net.outc(f), net.decode(feats))


# ---------------------------------------------------------------- FullResolutionUNet (tubular.md §3)

NARROW = (8, 16, 32, 64)


def _thin_lines(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy RGB images, each with two one-pixel-wide lines (a row, a column or a diagonal, at random) that
    are brighter than the noise, and their ``(n, 1, size, size)`` masks."""
    label = torch.zeros(n, 1, size, size)
    idx = torch.arange(size)
    for i in range(n):
        for _ in range(2):
            kind, pos = divmod(int(torch.randint(3 * size, (1,), generator=generator)), size)
            if kind == 0:
                label[i, 0, pos] = 1
            elif kind == 1:
                label[i, 0, :, pos] = 1
            else:
                label[i, 0, idx, (idx + pos) % size] = 1
    image = 0.5 * torch.rand(n, 3, size, size, generator=generator) + 0.5 * label
    return image, label


def _with_statistics(net: nn.Module, size: int = 32) -> nn.Module:
    """``net`` after one train-mode forward pass (non-trivial BatchNorm statistics), in eval mode."""
    net.train()
    with torch.no_grad():
        net(torch.rand(4, net.in_channels, size, size))
    return net.eval()


@pytest.mark.parametrize("features,size", [(NARROW, (64, 64)), (NARROW, (48, 80)), (NARROW, (8, 8)),
                                           (NARROW, (37, 50)), ((4, 8), (9, 15)), ((4, 8, 8, 16, 16), (32, 48))])
def test_full_resolution_shapes(features, size):
    torch.manual_seed(0)
    net = FullResolutionUNet(features=features).eval()
    h, w = size
    x = torch.rand(2, 3, h, w)
    with torch.no_grad():
        feats = net.encode(x)
        f = net.decode_features(feats)
        logits = net.decode(feats)
    # the skips and the bottleneck at H/2^s (floored), then the residual stream at full resolution, f0 wide
    sizes = [(h, w)]
    for _ in features[1:]:
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
    assert [tuple(t.shape[1:]) for t in feats] == [(c, *s) for c, s in zip(features, sizes)] + [(features[0], h, w)]
    assert logits.shape == (2, 2, h, w) and f.shape == (2, features[0], h, w)


def test_full_resolution_layers_and_dropout_placement():
    net = FullResolutionUNet(features=NARROW, dropout=0.3)
    dropouts = [(n, m.p) for n, m in net.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert dropouts == [("dropout_enc", 0.3), ("dropout_dec", 0.3)]
    assert (len(net.down), len(net.down_to_stream), len(net.up), len(net.up_to_stream)) == (3, 3, 2, 2)
    # the stream (8 channels) is concatenated to every block's input but the first Down's (where it is x_0 itself)
    assert [d.convs.conv_0.conv.in_channels for d in net.down] == [8, 16 + 8, 32 + 8]
    assert [u.convs.conv_0.conv.in_channels for u in (*net.up, net.up_full)] == [64 + 32 + 8, 32 + 16 + 8, 16 + 8 + 8]
    assert net.outc.in_channels == 8 and net.outc.out_channels == 2


def test_full_resolution_forward_is_decode_of_encode_and_encode_is_deterministic():
    torch.manual_seed(0)
    net = _with_statistics(FullResolutionUNet(features=NARROW))
    x = torch.rand(2, 3, 48, 48)
    with torch.no_grad():
        logits = net.decode(net.encode(x))
        torch.testing.assert_close(net(x), logits, rtol=0, atol=0)
        torch.testing.assert_close(net.outc(net.decode_features(net.encode(x))), logits, rtol=0, atol=0)
        with mc_dropout(net):
            a, b = net.encode(x), net.encode(x)
            assert all(torch.equal(s, t) for s, t in zip(a, b)), "encode sampled: a dropout sits inside it"
            assert not torch.equal(net.decode(a), net.decode(a)), "decode did not sample"


def test_full_resolution_mc_pass_fast_equals_naive():
    torch.manual_seed(0)
    net = _with_statistics(FullResolutionUNet(features=NARROW, dropout=0.5))
    x = torch.rand(2, 3, 32, 32)
    # chunk_size == B: each decode call draws the masks of one network(images) call
    torch.manual_seed(5)
    fast = mc_foreground_samples(net, x, 4, chunk_size=2)
    torch.manual_seed(5)
    naive = mc_foreground_samples_naive(net, x, 4)
    assert fast.shape == (4, 2, 32, 32) and torch.equal(fast, naive)
    assert not torch.equal(fast[0], fast[1]), "dropout did not sample"
    torch.manual_seed(11)
    fast = mc_foreground_samples(net, x, 1)
    torch.manual_seed(11)
    assert torch.equal(fast, mc_foreground_samples_naive(net, x, 1))
    assert not net.training and all(not m.training for m in net.modules())  # modes restored
    # no dropout: all samples are the eval-mode forward pass, in any chunking
    net0 = _with_statistics(FullResolutionUNet(features=NARROW, dropout=0.0))
    with torch.no_grad():
        ref = torch.softmax(net0(x), dim=1)[:, 1]
    for chunk in ("auto", 3):
        torch.testing.assert_close(mc_foreground_samples(net0, x, 3, chunk_size=chunk), ref.expand(3, -1, -1, -1),
                                   rtol=0, atol=1e-6)


def test_full_resolution_stream_carries_the_bottleneck_to_the_output():
    torch.manual_seed(0)
    net = _with_statistics(FullResolutionUNet(features=(4, 8, 8, 16), dropout=0.0))
    x = torch.rand(1, 3, 32, 32)
    feats = [t.detach() for t in net.encode(x)]

    def bottleneck_gradient() -> torch.Tensor:
        y = feats[-2].clone().requires_grad_()
        out = net.decode([*feats[:-2], y, feats[-1]])
        (g,) = torch.autograd.grad(out[:, 1].sum(), y)
        return g

    assert bottleneck_gradient().abs().sum() > 0
    # cut the U-Net's own path out of the bottleneck (up[0] gets zeros instead of y_d): the bottleneck still reaches
    # the output, through its write into the full-resolution stream ...
    hook = net.up[0].register_forward_pre_hook(lambda m, args: (torch.zeros_like(args[0]), args[1]))
    try:
        assert bottleneck_gradient().abs().sum() > 0
        # ... and through nothing else
        with torch.no_grad():
            net.down_to_stream[-1].weight.zero_()
        assert bottleneck_gradient().abs().sum() == 0
    finally:
        hook.remove()


def test_full_resolution_stream_receives_gradient_at_every_scale():
    torch.manual_seed(0)
    net = FullResolutionUNet(features=NARROW).train()
    image, label = _thin_lines(2, 32, torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(net(image), label[:, 0].long()).backward()
    for conv in [*net.down_to_stream, *net.up_to_stream]:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"features": (8,)}, "--features must be a list of at least two positive integers"),
    ({"features": ()}, "--features"),
    ({"features": 8}, "--features"),
    ({"features": "8,16"}, "--features"),
    ({"features": (8, 0, 16)}, "--features"),
    ({"features": (8, 16.0)}, "--features"),
    ({"features": (8, True)}, "--features"),
    ({"dropout": 1.0}, r"--dropout must be a number in \[0.0, 1.0\)"),
    ({"dropout": -0.1}, "--dropout"),
    ({"dropout": True}, "--dropout"),
    ({"dropout": "0.5"}, "--dropout"),
    ({"in_channels": 0}, "in_channels must be a positive integer"),
    ({"out_channels": 1.5}, "out_channels must be a positive integer"),
])
def test_full_resolution_bad_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        FullResolutionUNet(**kwargs)


def test_full_resolution_input_too_small():
    net = FullResolutionUNet(features=NARROW)
    with pytest.raises(ValueError, match=r"H, W >= 8, got \[1, 3, 4, 16\]"):
        net(torch.rand(1, 3, 4, 16))


def test_full_resolution_state_dict_round_trip_and_description():
    torch.manual_seed(0)
    net = _with_statistics(FullResolutionUNet(features=NARROW, dropout=0.2))
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    other = FullResolutionUNet(features=list(NARROW), dropout=0.2)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    other.eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), other(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        FullResolutionUNet(features=(8, 16, 32, 32)).load_state_dict(net.state_dict())
    count = sum(p.numel() for p in net.parameters())
    assert describe_network(other) == describe_network(net) == (
        f"FullResolutionUNet(features=(8, 16, 32, 64), in_channels=3, out_channels=2, dropout=[0.2, 0.2]; "
        f"{count} parameters)")
    # the kind and places of dropout are part of the description, so a run's identity tells them apart
    channel = FullResolutionUNet(features=list(NARROW), dropout=0.2, dropout_type="channel", dropout_at=["bottleneck"])
    assert describe_network(channel) == (f"FullResolutionUNet(features=(8, 16, 32, 64), in_channels=3, out_channels=2, "
                                         f"dropout=['Dropout2d(0.2)']; {count} parameters)")


@pytest.fixture
def one_thread():
    # two intra-op threads on a 2-core machine shared with other processes spin-wait for each other: a training
    # step then takes seconds instead of 0.1 s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_full_resolution_scripts_for_export():
    torch.manual_seed(0)
    net = _with_statistics(FullResolutionUNet(features=(4, 8, 16)))
    scripted = torch.jit.script(net)
    with torch.no_grad():
        for size in ((32, 32), (37, 50)):
            x = torch.rand(1, 3, *size)
            torch.testing.assert_close(scripted(x), net(x))


def test_full_resolution_learns_thin_lines(one_thread):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = FullResolutionUNet(features=NARROW, dropout=0.1).train()
    image, label = _thin_lines(4, 32, generator)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):  # about 0.1 s a step on one CPU thread
        opt.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0] and sum(losses[-3:]) < sum(losses[:3]), losses
    # the lines, not only the background, are learnt: they are more probable than the background around them
    net.eval()
    with torch.no_grad():
        p = torch.softmax(net(image), dim=1)[:, 1:]
    assert p[label == 1].mean() > p[label == 0].mean() + 0.1
