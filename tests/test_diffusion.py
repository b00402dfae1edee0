"""
The anisotropic-diffusion refiner (tubular.md §4), part by part against independent references: Fornberg's weights
against the seed's table and exact derivatives of polynomials, with their order of accuracy measured; RK4's global
error order on equations with known solutions; where the tensor lets mass move; the ReLU's and the clamp's
guarantees; gradients through the steps (gradcheck in float64); and the refiner as the bundle uses it: frozen
backbone, log-probability output, sliding windows, the MC-dropout pass, autocast, the loss of its training stage.
"""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import numpy as np
import pytest
import torch
from conftest import parse
from monai.inferers import SlidingWindowInferer

from scripts.diffusion import (AnisotropicDiffusion, central_difference, central_difference_weights, fornberg_weights,
                               rk4)
from scripts.networks import DiffusionRefiner, DropoutUNet, FullResolutionUNet
from scripts.uncertainty import MCDropoutInferer, mc_foreground_samples

# the seed's appendix table (Fornberg 1988, Table 1): first-derivative weights on the nodes -r .. r
TABLE = {
    2: [Fr(-1, 2), 0, Fr(1, 2)],
    4: [Fr(1, 12), Fr(-2, 3), 0, Fr(2, 3), Fr(-1, 12)],
    6: [Fr(-1, 60), Fr(3, 20), Fr(-3, 4), 0, Fr(3, 4), Fr(-3, 20), Fr(1, 60)],
    8: [Fr(1, 280), Fr(-4, 105), Fr(1, 5), Fr(-4, 5), 0, Fr(4, 5), Fr(-1, 5), Fr(4, 105), Fr(-1, 280)],
}


def tiny_backbone(cls=DropoutUNet, dtype=torch.float32):
    torch.manual_seed(0)
    features = [4, 8, 8, 16, 16] if cls is DropoutUNet else [4, 8, 8]
    net = cls(features=features, dropout=0.3).to(dtype).eval()
    with torch.no_grad():
        net.outc.weight.mul_(30.0)  # an untrained network's probabilities are nearly flat: give them contrast
    return net


@pytest.mark.parametrize("order", [2, 4, 6, 8])
def test_central_difference_weights_are_fornbergs_and_reach_their_order(order):
    assert central_difference_weights(order) == TABLE[order]  # exact fractions
    # exact for every polynomial of degree <= order (at irregular nodes too), not for degree order + 1
    r = order // 2
    nodes = list(range(-r, r + 1))
    for degree in range(order + 2):
        x0 = Fr(3, 7)
        approx = sum(w * (x0 + k) ** degree for w, k in zip(central_difference_weights(order), nodes))
        exact = degree * x0 ** (degree - 1) if degree else 0
        assert (approx == exact) == (degree <= order), degree
    irregular = [Fr(0), Fr(1, 3), Fr(1), Fr(2)]
    w = fornberg_weights(irregular, Fr(1, 2), 2)  # a second derivative at an off-node point
    assert sum(c * x**3 for c, x in zip(w, irregular)) == 6 * Fr(1, 2)
    # measured order on a smooth field, through the tensor stencil with replicated borders (interior only)
    errors = []
    for h in (0.2, 0.1, 0.05):
        x = torch.arange(-3.0, 3.0 + h / 2, h, dtype=torch.float64)
        u = torch.sin(x).view(1, 1, 1, -1)
        d = central_difference(u, -1, [float(c) for c in TABLE[order]]) / h
        interior = (x.abs() < 1.0)
        errors.append((d[0, 0, 0, interior] - torch.cos(x[interior])).abs().max().item())
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(m - order) < 0.25 for m in measured), measured


def test_rk4_global_error_falls_at_fourth_order():
    # logistic growth du/dt = u (1 - u) stays inside [0, 1] (the clamp never acts) and has a closed form
    u0 = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    exact = u0 / (u0 + (1 - u0) * math.exp(-2.0))
    errors = [(rk4(lambda u: u * (1 - u), u0, 2.0 / n, n) - exact).abs().max().item() for n in (5, 10, 20, 40)]
    measured = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(m - 4.0) < 0.15 for m in measured), measured


def test_without_perpendicular_diffusion_mass_moves_along_v_only():
    f = AnisotropicDiffusion(order=8, lambda_parallel=1.0, lambda_perp=0.0)
    along_x = torch.tensor([1.0, 0.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 24, 24)
    y = torch.arange(24, dtype=torch.float64)
    stripes = torch.exp(-((y - 11.5) ** 2) / 8).view(1, 1, 24, 1).expand(1, 1, 24, 24).clone()  # varies across v
    assert torch.equal(rk4(lambda u: f(u, along_x), stripes, 0.1, 50), stripes)
    assert not torch.equal(rk4(lambda u: f(u, along_x), stripes.transpose(-1, -2), 0.1, 50),
                           stripes.transpose(-1, -2))  # the same profile along v spreads
    # a round blob under v at 30°: its spread along v grows, across v it stays (the plain equation, unclamped: the
    # high-order stencil's small undershoots stay, and the mass is conserved, so the blob's moments are those of a
    # distribution); with λ⊥ = λ∥ both grow
    n = 64
    yy, xx = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64), indexing="ij")
    blob = 0.8 * torch.exp(-((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / 8).view(1, 1, n, n)
    theta = math.radians(30)
    e = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
    v = e.view(1, 2, 1, 1).expand(1, 2, n, n)

    def spreads(u):
        w = u[0, 0] / u.sum()
        a = (xx - 31.5) * e[0] + (yy - 31.5) * e[1]
        b = -(xx - 31.5) * e[1] + (yy - 31.5) * e[0]
        return float((w * a * a).sum()), float((w * b * b).sum())

    before = spreads(blob)
    for perp, grows_across in ((0.0, False), (1.0, True)):
        g = AnisotropicDiffusion(order=8, lambda_parallel=1.0, lambda_perp=perp, rectify=False)
        out = rk4(lambda u: g(u, v), blob, 0.1, 100, clamp=None)
        assert float(out.sum()) == pytest.approx(float(blob.sum()), rel=1e-9)
        along, across = spreads(out)
        assert along > before[0] + 15  # variance grows by 2 λ t = 20 for the continuous equation
        assert (across > before[1] + 15) == grows_across and (abs(across - before[1]) < 0.3) != grows_across


def test_the_rectified_equation_never_lowers_u_and_the_clamp_keeps_it_a_probability():
    torch.manual_seed(1)
    u = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(2, 2, 32, 32, dtype=torch.float64), dim=1)
    f = AnisotropicDiffusion(order=4, lambda_parallel=1.0, lambda_perp=0.3)
    assert (f(u, v) >= 0).all()
    plain = AnisotropicDiffusion(order=4, lambda_parallel=1.0, lambda_perp=0.3, rectify=False)
    assert (plain(u, v) < 0).any()  # without the ReLU it would lower u somewhere
    previous = u
    for _ in range(5):
        nxt = rk4(lambda w: f(w, v), previous, 0.1, 1)
        assert (nxt >= previous).all()
        previous = nxt
    # far beyond the explicit scheme's stability limit the values blow up; the clamp still bounds them
    wild = rk4(lambda w: f(w, v), u, 5.0, 10)
    unclamped = rk4(lambda w: f(w, v), u, 5.0, 10, clamp=None)
    assert unclamped.max() > 1 and wild.min() >= 0 and wild.max() <= 1


@pytest.mark.parametrize("checkpoint_steps", [False, True])
def test_gradients_reach_the_direction_head_through_the_steps(checkpoint_steps):
    backbone = tiny_backbone(dtype=torch.float64)
    refiner = DiffusionRefiner(backbone, direction_kernel=3, steps=3, dt=0.2, order=4, lambda_perp=0.1,
                               checkpoint_steps=checkpoint_steps).double().train()
    torch.manual_seed(2)
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64)
    feats = [f.detach() for f in refiner.encode(x)]
    names = ["head.weight", "head.bias"]

    def refined(weight, bias):
        out = torch.func.functional_call(refiner, {"head.weight": weight, "head.bias": bias}, (x,))
        return out[:, 1].exp()

    params = tuple(dict(refiner.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(refined, params, eps=1e-6, atol=1e-6, fast_mode=True)
    # and the gradient is there, and only there, after a backward pass through the module
    refiner.zero_grad()
    refiner.decode(feats)[:, 1].exp().sum().backward()
    assert refiner.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in refiner.backbone.parameters())


def test_checkpointed_steps_save_a_fraction_of_the_activations():
    refiner = DiffusionRefiner(tiny_backbone(), direction_kernel=3, steps=20).train()
    x = torch.rand(1, 3, 32, 32)
    saved = {}
    for checkpoint_steps in (False, True):
        refiner.checkpoint_steps = checkpoint_steps
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = refiner(x)
        out[:, 1].sum().backward()
        saved[checkpoint_steps] = count[0]
    pixels = 32 * 32
    # per step: the step's input u only, against the ~30 maps an RK4 step of the operator keeps
    assert saved[True] < 60 * pixels + saved[False] / 10 and saved[False] > 20 * 20 * pixels, saved


def test_a_break_fills_along_the_vessel_direction_and_not_across_it():
    u = torch.zeros(1, 1, 21, 41)
    u[0, 0, 10, 5:18] = 1
    u[0, 0, 10, 23:36] = 1  # a 5-pixel break
    f = AnisotropicDiffusion()
    for v, fills in (((1.0, 0.0), True), ((0.0, 1.0), False)):
        out = rk4(lambda w: f(w, torch.tensor(v).view(1, 2, 1, 1).expand(1, 2, 21, 41)), u, 0.1, 100)
        assert bool((out[0, 0, 10, 18:23] > 0.5).all()) == fills
        assert bool((out[0, 0, 8:13:4] > 0.5).any()) != fills  # across: the line widens instead


@pytest.mark.parametrize("cls", [DropoutUNet, FullResolutionUNet])
def test_the_refiner_is_a_frozen_backbone_with_log_probability_output(cls):
    backbone = tiny_backbone(cls)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    refiner = DiffusionRefiner(backbone, direction_kernel=5, steps=4).train()
    assert not refiner.backbone.training and refiner.head.training
    assert [n for n, p in refiner.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    x = torch.rand(2, 3, 32, 32)
    out = refiner(x)
    assert out.shape == backbone(x).shape and out.dtype == torch.float32
    p = out.exp()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(2, 32, 32), atol=2e-6, rtol=0)
    torch.testing.assert_close(torch.softmax(out, dim=1), p, atol=2e-6, rtol=0)
    with torch.no_grad():
        u0 = torch.softmax(backbone(x), dim=1)[:, 1]
    assert (p[:, 1] >= u0 - 1e-6).all() and (p[:, 1] > u0 + 1e-3).any()  # raised, never lowered
    torch.testing.assert_close(refiner.decode(refiner.encode(x)), out)
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in before.items())  # BatchNorm stats untouched
    with pytest.raises(ValueError, match="direction_kernel must be an odd integer"):
        DiffusionRefiner(backbone, direction_kernel=4)


def test_the_refiner_runs_in_sliding_windows_the_mc_pass_and_autocast():
    backbone = tiny_backbone()
    refiner = DiffusionRefiner(backbone, direction_kernel=3, steps=5).eval()
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        windows = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=4, overlap=0.25, mode="gaussian")(x, refiner)
    assert windows.shape == (1, 2, 40, 56) and torch.isfinite(windows).all()
    # the MC pass: each dropout sample of the backbone is refined; with the same draws (one seed) the refined
    # sample is the backbone's sample raised by the diffusion
    torch.manual_seed(3)
    raw = mc_foreground_samples(backbone, x[..., :32, :32], 4, chunk_size=2)
    torch.manual_seed(3)
    refined = mc_foreground_samples(refiner, x[..., :32, :32], 4, chunk_size=2)
    assert refined.shape == (4, 1, 32, 32) and raw.std(dim=0).max() > 0
    assert (refined >= raw - 1e-5).all() and (refined > raw + 1e-3).any()
    maps = MCDropoutInferer(num_samples=3, chunk_size=3)(x[..., :32, :32], refiner)
    assert maps.shape == (1, 5, 32, 32) and torch.isfinite(maps).all()
    # the backbone in its own windows, the solver on the whole input: with N = 0 the output is MONAI's sliding-window
    # inference of the backbone; the MC pass samples it too
    windowed = DiffusionRefiner(backbone, direction_kernel=3, steps=0, backbone_window=16).eval()
    expected = SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=64, overlap=0.25, mode="gaussian")(x, backbone)
    with torch.no_grad():
        torch.testing.assert_close(windowed(x).exp(), torch.softmax(expected, dim=1), atol=1e-5, rtol=0)
    windowed.steps = 5
    maps = MCDropoutInferer(num_samples=3, chunk_size=3)(x, windowed)
    assert maps.shape == (1, 5, 40, 56) and maps[:, 2].max() > 0  # dropout varies the samples
    # autocast (bfloat16 on this CPU; float16 on CUDA): the backbone and head in low precision, the solver not
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = refiner(x[..., :32, :32])
    with torch.no_grad():
        full = refiner(x[..., :32, :32])
    assert low.dtype == torch.float32
    assert (low.exp() - full.exp()).abs().max() < 0.05


def test_the_stages_bce_is_the_binary_cross_entropy_of_the_refined_probability():
    parser = parse(["configs/train.yaml", "configs/vessel/train.yaml", "configs/vessel/refiner.yaml",
                    "configs/vessel/train_refiner.yaml"], device="cpu")
    torch.manual_seed(4)
    u = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.98 + 0.01
    y = (torch.rand(2, 1, 8, 8) > 0.5).double()
    log_p = torch.log(torch.cat([1 - u, u], dim=1))
    bce = parser.get_parsed_content("refiner_losses#bce")(log_p, y)
    assert float(bce) == pytest.approx(float(torch.nn.functional.binary_cross_entropy(u, y)), rel=1e-12)
    dice = parser.get_parsed_content("refiner_losses#dice")(log_p, y)
    hand = 1 - (2 * (u * y).sum((1, 2, 3)) + 1e-5) / (u.sum((1, 2, 3)) + y.sum((1, 2, 3)) + 1e-5)
    assert float(dice) == pytest.approx(float(hand.mean()), rel=1e-9)
    assert np.isfinite(float(parser.get_parsed_content("refiner_losses#cldice")(log_p, y)))
