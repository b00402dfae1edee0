"""MC-dropout uncertainty maps and the fast (encode once, decode N times) MC pass against its naive reference."""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import torch
from scripts.losses import PolyDiceLoss
from scripts.networks import DropoutUNet, FullResolutionUNet, mc_dropout
from scripts.uncertainty import (
    binary_entropy,
    mc_foreground_samples,
    mc_foreground_samples_naive,
    uncertainty_maps,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TINY = (4, 8, 8, 16, 16)


def _np_entropy(p: np.ndarray) -> np.ndarray:
    """-p ln p - (1-p) ln(1-p) in float64, with 0 ln 0 = 0 by hand (not via the module's xlogy)."""
    p = p.astype(np.float64)
    q = 1.0 - p
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        b = np.where(q > 0, -q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return a + b


@functools.lru_cache(maxsize=None)
def _trained(dropout: float) -> tuple[DropoutUNet, torch.Tensor]:
    torch.manual_seed(0)
    net = DropoutUNet(features=TINY, dropout=dropout)
    x = torch.rand(8, 3, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    c = torch.randint(8, 24, (8, 2))
    y = (((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) < 36).float()[:, None]
    x[:, :1] += y
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss_fn = PolyDiceLoss()
    net.train()
    for _ in range(15):
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    return net, x


def _trained_net(dropout: float = 0.5) -> tuple[DropoutUNet, torch.Tensor]:
    """A tiny U-Net after 15 Adam steps on disc images (so its dropout visibly changes its output and its
    BatchNorm statistics are not the initial ones), in train mode with gradients; and its 8 training images.
    Trained once per module, handed out as a fresh copy."""
    net, x = _trained(dropout)
    net = copy.deepcopy(net).train()
    return net, x.clone()


# ---------------------------------------------------------------- maps


def test_uncertainty_maps_match_float64_hand_computation_with_exact_zeros_and_ones():
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(7, 2, 5, 4, generator=gen)
    s[:, 0, 0, 0] = 0.0  # every sample 0: entropy and MI exactly 0
    s[:, 0, 0, 1] = 1.0  # every sample 1
    s[:3, 1, 2, 3] = 0.0  # a mix of exact 0, exact 1 and interior values
    s[3:5, 1, 2, 3] = 1.0
    s[2, 1, 4, 0] = 1.0
    maps = uncertainty_maps(s)

    a = s.numpy().astype(np.float64)
    mean = a.sum(0) / 7
    ref = {
        "mean": mean,
        "variance": ((a - mean) ** 2).sum(0) / 7,
        "entropy": _np_entropy(mean),
        "mutual_information": _np_entropy(mean) - _np_entropy(a).sum(0) / 7,
    }
    assert set(maps) == set(ref)
    for k, v in maps.items():
        assert v.shape == (2, 5, 4) and v.dtype == torch.float32, k
        assert torch.isfinite(v).all(), f"{k} is not finite"
        np.testing.assert_allclose(v.numpy(), ref[k], rtol=0, atol=2e-6, err_msg=k)
    for k in ("entropy", "mutual_information"):
        assert maps[k][0, 0, 0] == 0 and maps[k][0, 0, 1] == 0, f"{k} of all-0 / all-1 samples must be exactly 0"
    torch.testing.assert_close(maps["variance"], torch.var(s, dim=0, unbiased=False), rtol=0, atol=1e-7)

    # float64 in, float64 out: then the agreement is to float64 rounding
    maps64 = uncertainty_maps(s.double())
    for k, v in maps64.items():
        assert v.dtype == torch.float64
        np.testing.assert_allclose(v.numpy(), ref[k], rtol=0, atol=1e-14, err_msg=k)


def test_mutual_information_nonnegative_and_zero_for_identical_samples():
    gen = torch.Generator().manual_seed(4)
    for shape in ((10, 64, 64), (2, 3, 50), (1, 40)):
        mi = uncertainty_maps(torch.rand(*shape, generator=gen))["mutual_information"]
        assert mi.min() >= -1e-7, f"MI {mi.min().item()} < 0 beyond rounding for N = {shape[0]}"
    # beta-like samples piled up near 0 and 1 (where entropies are steep)
    mi = uncertainty_maps(torch.rand(20, 4096, generator=gen) ** 8)["mutual_information"]
    assert mi.min() >= -1e-7
    same = torch.rand(1, 3, 8, 8, generator=gen).expand(9, -1, -1, -1)
    maps = uncertainty_maps(same)
    torch.testing.assert_close(maps["mutual_information"], torch.zeros(3, 8, 8), rtol=0, atol=1e-6)
    torch.testing.assert_close(maps["variance"], torch.zeros(3, 8, 8), rtol=0, atol=1e-12)
    torch.testing.assert_close(maps["entropy"], binary_entropy(same[0]), rtol=0, atol=1e-6)
    one = uncertainty_maps(same[:1])  # N = 1: the sample itself, no disagreement
    assert torch.equal(one["mean"], same[0]) and not one["mutual_information"].any() and not one["variance"].any()


def test_maps_promote_half_precision():
    s = torch.rand(5, 6, 7).half()
    maps = uncertainty_maps(s)
    assert all(v.dtype == torch.float32 for v in maps.values())
    torch.testing.assert_close(maps["mean"], s.float().mean(0))


def test_binary_entropy_values_and_symmetry():
    h = binary_entropy(torch.tensor([0.0, 1.0, 0.5]))
    assert h[0] == 0 and h[1] == 0
    assert h[2].item() == pytest.approx(math.log(2), abs=1e-7)
    p = torch.linspace(0, 1, 1001, dtype=torch.float64)
    h = binary_entropy(p)
    assert torch.isfinite(h).all() and h.min() >= 0 and h.max() <= math.log(2) + 1e-15
    torch.testing.assert_close(h, binary_entropy(1 - p), rtol=0, atol=1e-15)
    torch.testing.assert_close(h, torch.from_numpy(_np_entropy(p.numpy())), rtol=0, atol=1e-15)
    # tiny p, where 1 - p rounds to 1 in float32: H ≈ p (1 - ln p), not just -p ln p
    t = torch.tensor([1e-10], dtype=torch.float32)
    assert binary_entropy(t).item() == pytest.approx(1e-10 * (1 - math.log(1e-10)), rel=1e-5)
    assert binary_entropy(torch.tensor([0.5], dtype=torch.float16)).dtype == torch.float32


# ---------------------------------------------------------------- the fast pass against the naive one


def test_fast_equals_naive_without_dropout_and_all_samples_identical():
    torch.manual_seed(0)
    net = DropoutUNet(features=TINY, dropout=0.0)
    net.train()
    net(torch.rand(4, 3, 32, 32))  # non-trivial BatchNorm statistics
    x = torch.rand(2, 3, 32, 32)
    fast = mc_foreground_samples(net, x, 4)
    naive = mc_foreground_samples_naive(net, x, 4)
    assert fast.shape == naive.shape == (4, 2, 32, 32) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, naive, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast, fast[:1].expand_as(fast), rtol=0, atol=1e-6)
    net.eval()
    with torch.no_grad():
        ref = torch.softmax(net(x), dim=1)[:, 1]
    torch.testing.assert_close(fast[0], ref, rtol=0, atol=1e-6)
    # chunking changes nothing when nothing is random (5·2 pairs in chunks of 3, 3, 3, 1)
    torch.testing.assert_close(mc_foreground_samples(net, x, 5, chunk_size=3), fast[:1].expand(5, -1, -1, -1),
                               rtol=0, atol=1e-6)


def test_fast_equals_naive_exactly_for_one_sample_with_the_same_seed():
    net, x = _trained_net()
    for images in (x[:1], x[:3]):
        torch.manual_seed(11)
        fast = mc_foreground_samples(net, images, 1)
        torch.manual_seed(11)
        naive = mc_foreground_samples_naive(net, images, 1)
        assert torch.equal(fast, naive)


def test_chunks_of_one_sample_draw_exactly_the_naive_masks():
    # chunk_size == B: each decode call is one sample of all B images, as in N successive network(images) calls
    net, x = _trained_net()
    torch.manual_seed(5)
    fast = mc_foreground_samples(net, x[:2], 5, chunk_size=2)
    torch.manual_seed(5)
    naive = mc_foreground_samples_naive(net, x[:2], 5)
    assert torch.equal(fast, naive)
    assert not torch.equal(fast[0], fast[1]), "dropout did not sample"


def test_chunk_order_is_sample_major_and_chunks_bound_the_decode_batch():
    net, x = _trained_net()
    images = x[:2]
    # chunk_size 1: pair n·B + b is decoded alone, so it draws the masks of network(images[b:b+1]) called in the
    # order (n, b) = (0, 0), (0, 1), (1, 0), ...
    torch.manual_seed(6)
    fast = mc_foreground_samples(net, images, 3, chunk_size=1)
    torch.manual_seed(6)
    ref = torch.stack([torch.cat([mc_foreground_samples_naive(net, images[b:b + 1], 1)[0] for b in range(2)])
                       for _ in range(3)])
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)

    # chunks not aligned with samples: 5·2 pairs in decode calls of 3, 3, 3, 1; encode runs once on the 2 images
    calls = {"encode": [], "decode": []}
    enc, dec = net.encode, net.decode
    net.encode = lambda t: (calls["encode"].append(t.shape[0]), enc(t))[1]
    net.decode = lambda f: (calls["decode"].append(f[0].shape[0]), dec(f))[1]
    try:
        chunked = mc_foreground_samples(net, images, 5, chunk_size=3)
    finally:
        del net.encode, net.decode
    assert calls == {"encode": [2], "decode": [3, 3, 3, 1]}
    assert chunked.shape == (5, 2, 32, 32)
    flat = chunked.flatten(0, 1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(10) for j in range(i)), "samples repeat"


def test_fast_and_naive_agree_in_distribution():
    net, x = _trained_net()
    images, n = x[:2], 200
    torch.manual_seed(7)
    fast = mc_foreground_samples(net, images, n)
    naive = mc_foreground_samples_naive(net, images, n)
    mf, mn = uncertainty_maps(fast), uncertainty_maps(naive)
    assert mn["variance"].mean() > 1e-3, "the network's dropout barely matters: the test would have no power"
    # per pixel, a two-sample z statistic of the means; 2048 pixels, so |z| < 5 everywhere under equality
    se = ((mf["variance"] + mn["variance"]) / (n - 1)).sqrt().clamp_min(1e-6)
    z = (mf["mean"] - mn["mean"]) / se
    assert z.abs().max() < 5, f"max |z| = {z.abs().max().item():.2f}"
    assert z.mean().abs() < 0.5
    # the spread (sampling error of a mean of 200 variances: a few per cent) and the epistemic part
    for k in ("variance", "mutual_information"):
        ratio = (mf[k].mean() / mn[k].mean()).item()
        assert 0.85 < ratio < 1.18, f"{k}: fast/naive = {ratio:.3f}"
    # and not what dropout off would give
    net.eval()
    with torch.no_grad():
        det = torch.softmax(net(images), dim=1)[:, 1]
    assert ((det - mf["mean"]) / se).abs().max() > 5


# ---------------------------------------------------------------- the pass leaves the model alone


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("fast", [True, False])
def test_pass_changes_no_parameter_statistic_gradient_or_mode(mode, fast):
    net, x = _trained_net()
    net.zero_grad(set_to_none=True)
    {"train": net.train, "eval": net.eval, "mixed": lambda: net.down2.eval()}[mode]()
    state = {k: v.clone() for k, v in net.state_dict().items()}  # parameters and BatchNorm buffers
    modes = {name: m.training for name, m in net.named_modules()}
    out = mc_foreground_samples(net, x[:2], 3) if fast else mc_foreground_samples_naive(net, x[:2], 3)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed during the pass"
    assert all(p.grad is None for p in net.parameters())
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert not out.requires_grad and not out.is_inference() and out.dtype == torch.float32
    out += 0  # an ordinary tensor: callers may modify it


def test_modes_restored_when_the_pass_fails():
    net, x = _trained_net()
    net.train()
    with pytest.raises(RuntimeError):
        mc_foreground_samples(net, torch.rand(2, 5, 32, 32), 2)  # wrong number of input channels
    assert all(m.training for m in net.modules())


def test_data_parallel_wrapper_is_unwrapped():
    net, x = _trained_net()
    wrapped = nn.DataParallel(net)  # without GPUs a plain pass-through wrapper without encode/decode
    torch.manual_seed(8)
    a = mc_foreground_samples(wrapped, x[:2], 3)
    torch.manual_seed(8)
    b = mc_foreground_samples(net, x[:2], 3)
    assert torch.equal(a, b)
    torch.manual_seed(8)
    a = mc_foreground_samples_naive(wrapped, x[:2], 2)
    torch.manual_seed(8)
    assert torch.equal(a, mc_foreground_samples_naive(net, x[:2], 2))


def test_pass_draws_from_the_global_stream_without_reseeding():
    net, x = _trained_net()
    torch.manual_seed(9)
    a = mc_foreground_samples(net, x[:1], 2)
    b = mc_foreground_samples(net, x[:1], 2)
    assert not torch.equal(a, b)  # the stream moved on
    state = torch.random.get_rng_state()
    with torch.random.fork_rng():
        mc_foreground_samples(net, x[:1], 2)
    assert torch.equal(torch.random.get_rng_state(), state)  # how the caller keeps training's stream intact


# ---------------------------------------------------------------- arguments


def test_argument_errors():
    net = DropoutUNet(features=TINY)
    x = torch.rand(1, 3, 16, 16)
    for n in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="num_samples"):
            mc_foreground_samples(net, x, n)
        with pytest.raises(ValueError, match="num_samples"):
            mc_foreground_samples_naive(net, x, n)
    for c in (0, -2, 2.0, False):
        with pytest.raises(ValueError, match="chunk_size"):
            mc_foreground_samples(net, x, 2, chunk_size=c)
    for bad in (x[0], x[None], torch.rand(0, 3, 16, 16), x.numpy()):
        with pytest.raises(ValueError, match="images"):
            mc_foreground_samples(net, bad, 2)
        with pytest.raises(ValueError, match="images"):
            mc_foreground_samples_naive(net, bad, 2)
    plain = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Dropout(0.5))  # no split: full passes, as the reference
    assert mc_foreground_samples(plain, x, 2).shape == mc_foreground_samples_naive(plain, x, 2).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="dropout"):
        mc_foreground_samples(nn.Conv2d(3, 2, 1), x, 2)
    with pytest.raises(ValueError, match="dropout"):
        mc_foreground_samples_naive(nn.Conv2d(3, 2, 1), x, 2)
    with pytest.raises(ValueError, match="2, H, W"):
        mc_foreground_samples(DropoutUNet(out_channels=1, features=TINY), x, 2)
    with pytest.raises(ValueError, match="2, H, W"):
        mc_foreground_samples_naive(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout()), x, 2)
    with pytest.raises(ValueError, match="network"):
        mc_foreground_samples(lambda t: t, x, 2)
    for bad in (torch.tensor(0.5), torch.rand(0, 4), [0.5]):
        with pytest.raises(ValueError, match="samples"):
            uncertainty_maps(bad)


def test_mc_inferer_channels_against_the_deterministic_forward_and_the_maps():
    from monai.data import MetaTensor
    from scripts.uncertainty import MCDropoutInferer

    torch.manual_seed(0)
    net = DropoutUNet(3, 2, features=(4, 8, 8, 16, 16), dropout=0.0).eval()
    x = MetaTensor(torch.rand(2, 3, 32, 32), meta={"filename_or_obj": ["a.png", "b.png"]})
    with torch.no_grad():
        expected = torch.softmax(net(x.as_tensor()), 1)
    plain = MCDropoutInferer(0)(x, net)
    mc = MCDropoutInferer(3, chunk_size=2)(x, net)
    assert plain.shape == (2, 2, 32, 32) and mc.shape == (2, 5, 32, 32)
    assert isinstance(mc, MetaTensor) and mc.meta["filename_or_obj"] == ["a.png", "b.png"]  # for Invertd
    torch.testing.assert_close(plain.as_tensor(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(mc.as_tensor()[:, :2], expected, atol=1e-6, rtol=0)  # p = 0: all samples equal
    torch.testing.assert_close(mc.as_tensor()[:, 3], binary_entropy(expected[:, 1]), atol=1e-6, rtol=0)
    assert mc[:, 2].abs().max() < 1e-6 and mc[:, 4].abs().max() < 1e-6  # no variance, no mutual information
    assert MCDropoutInferer.output_names(3)[1:] == ["probability", "variance", "entropy", "mutual_information"]
    for bad in (1, -1, True):
        with pytest.raises(ValueError, match="mc_samples must be 0"):
            MCDropoutInferer(bad)


def test_auto_chunk_size_follows_the_width_of_the_network_and_the_image():
    from scripts.uncertainty import auto_chunk_size

    # without a measured figure, the estimate 2·f0·H·W float32 a pair against 8 MiB, at most 8: Table 1 U-Net at
    # 224 px (25.7 MB a pair) -> 1
    assert auto_chunk_size(torch.empty(1, 64, 224, 224)) == 1
    assert auto_chunk_size(torch.empty(4, 16, 96, 96)) == (8 << 20) // (2 * 16 * 96 * 96 * 4) == 7
    assert auto_chunk_size(torch.empty(8, 8, 64, 64)) == 8  # capped
    assert auto_chunk_size(torch.empty(1, 64, 2048, 2048)) == 1  # never 0
    # full forward passes (no split): the batch itself on a CPU, at least 64 pairs elsewhere
    assert auto_chunk_size(torch.empty(5, 3, 64, 64), split=False) == 5
    assert auto_chunk_size(torch.empty(5, 3, 64, 64, device="meta"), split=False) == 64
    assert auto_chunk_size(torch.empty(80, 3, 64, 64, device="meta"), split=False) == 80
    # a measured figure replaces the estimate on a CPU; the GPU and full-pass rules do not use it
    assert auto_chunk_size(torch.empty(1, 32, 64, 64), pair_bytes=2 << 20) == 4
    assert auto_chunk_size(torch.empty(1, 32, 64, 64), pair_bytes=100 << 20) == 1
    assert auto_chunk_size(torch.empty(1, 32, 64, 64, device="meta"), pair_bytes=2 << 20) == 64
    assert auto_chunk_size(torch.empty(5, 3, 64, 64), split=False, pair_bytes=1) == 5


class _LargestOpOutput(TorchDispatchMode):
    """The bytes of the largest tensor any aten op returns while active: every intermediate, functional ops
    (torch.cat, interpolation, additions) included, independent of the module hooks the bundle measures with."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("network, size, formula, old, new", [
    # DropoutUNet: up4's concatenation of skip and upsampled features, 2·f0·H·W floats: the old estimate, exactly
    (lambda: DropoutUNet(features=(16, 32, 64, 128, 128)), 96, lambda f, s: 2 * f[0] * s * s * 4, 7, 7),
    # FullResolutionUNet: up_full reads skip, residual stream and upsampled u_1, (2·f0 + f1)·H·W floats = 2x
    (lambda: FullResolutionUNet(features=(8, 16, 32, 64)), 128, lambda f, s: (2 * f[0] + f[1]) * s * s * 4, 8, 4),
], ids=["DropoutUNet", "FullResolutionUNet"])
def test_auto_chunk_follows_the_measured_largest_decoder_tensor(network, size, formula, old, new):
    from scripts.uncertainty import auto_chunk_size, decoder_pair_bytes

    torch.manual_seed(0)
    net = network()
    x = torch.rand(1, 3, size, size)
    # independently: the largest tensor of every aten op in a full decoder run on one pair
    with mc_dropout(net), torch.inference_mode():
        feats = net.encode(x)
        with _LargestOpOutput() as largest:
            net.decode(feats)
    pair_bytes = decoder_pair_bytes(net, x)
    assert pair_bytes == largest.bytes == formula(net.features, size)  # equal, not merely bounded
    assert auto_chunk_size(feats[0]) == old  # the old rule, 2·f0·H·W floats a pair
    assert auto_chunk_size(feats[0], pair_bytes=pair_bytes) == new == max(1, min(8, (8 << 20) // pair_bytes))
    # "auto" runs the first pair alone, measuring, then chunks of `new` pairs; every pair is sampled once
    calls, decode = [], net.decode
    net.decode = lambda f: (calls.append(f[0].shape[0]), decode(f))[1]
    torch.manual_seed(3)
    auto = mc_foreground_samples(net, x, new + 2, chunk_size="auto")
    assert calls == [1, new, 1]
    del net.decode
    assert auto.shape == (new + 2, 1, size, size) and len({round(float(a.sum()), 3) for a in auto}) == new + 2
