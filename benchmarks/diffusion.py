# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The anisotropic-diffusion refiner's solver (tubular.md §4; scripts.diffusion) on a CHASE_DB1-sized map (999×960,
W×H), side by side in one run:

1. the central differences (order 8) two ways: ``scripts.diffusion.central_difference`` (shifted slices of the
   replicate-padded map, accumulated in place) against the same stencil as ``conv2d`` with a 1×9 / 9×1 kernel; per
   derivative and per evaluation of the right-hand side ``ReLU(∇·(D∇u))``. Both must agree (else exit 1);
2. the solver, ``rk4`` of ``AnisotropicDiffusion`` with N = 10, 100, 1000 steps (Δt 0.1), against one forward pass
   of each backbone on the same image, whole, in eval mode, random weights (the time does not depend on them): the
   vessel U-Net (configs/vessel/unet.yaml's widths), the full-width Table 1 U-Net, the full-resolution U-Net
   (configs/vessel/frunet.yaml) and its class default widths. The issue's target: N = 100 under one forward pass of
   the full-width U-Net;
3. what backpropagation through the solver keeps: the bytes autograd saves for N steps on a crop, with each step
   recomputed in the backward pass (``checkpoint_steps``, the refiner's default in training) and without.

Figures are medians over ``--repeats`` rounds (the sides alternate; N = 1000 runs once a round). Torch runs on
``--threads`` threads.

    python benchmarks/diffusion.py                       # 999×960, 3 rounds, 2 threads
    python benchmarks/diffusion.py --threads 1
    python benchmarks/diffusion.py --quick               # toy size, seconds (as tests/test_benchmarks.py runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's `scripts` package

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scripts.diffusion import AnisotropicDiffusion, central_difference, central_difference_weights, rk4  # noqa: E402
from scripts.networks import DiffusionRefiner, DropoutUNet, FullResolutionUNet  # noqa: E402

BACKBONES = {  # name: (class, features)
    "U-Net, vessel widths (unet.yaml)": (DropoutUNet, [16, 32, 64, 128, 128]),
    "U-Net, full width (Table 1)": (DropoutUNet, [64, 128, 256, 512, 512]),
    "FR U-Net, vessel widths (frunet.yaml)": (FullResolutionUNet, [16, 32, 64, 128]),
    "FR U-Net, class default": (FullResolutionUNet, [32, 64, 128, 256]),
}
FULL_WIDTH = "U-Net, full width (Table 1)"


def conv_difference(u: torch.Tensor, dim: int, kernel: torch.Tensor) -> torch.Tensor:
    """The same stencil as a convolution: ``kernel`` (1, 1, 1, 2r + 1), transposed for y."""
    r = kernel.shape[-1] // 2
    if dim == -1:
        return F.conv2d(F.pad(u, (r, r, 0, 0), mode="replicate"), kernel)
    return F.conv2d(F.pad(u, (0, 0, r, r), mode="replicate"), kernel.transpose(-1, -2))


class ConvDiffusion(AnisotropicDiffusion):
    """:class:`AnisotropicDiffusion` with its differences as convolutions (the benchmark's other side)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kernel = torch.tensor(self._weights).view(1, 1, 1, -1)

    def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = self.kernel.to(u.dtype)
        ux, uy = conv_difference(u, -1, k), conv_difference(u, -2, k)
        along = (self.lambda_parallel - self.lambda_perp) * (v[:, 0:1] * ux + v[:, 1:2] * uy)
        jx = along * v[:, 0:1] + self.lambda_perp * ux
        jy = along * v[:, 1:2] + self.lambda_perp * uy
        return torch.relu(conv_difference(jx, -1, k) + conv_difference(jy, -2, k))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fields(w: int, h: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth probability map with thin ridges and a smooth random unit direction field, (1, 1|2, W, H)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, max(2, w // 40), max(2, h // 40), generator=g)
    smooth = F.interpolate(coarse, size=(w, h), mode="bicubic", align_corners=False)
    u = torch.exp(-(smooth[:, :1] * 6) ** 2).clamp(0, 1)  # ridges along the zero set of a random field
    v = F.normalize(smooth[:, 1:], dim=1)
    return u, v


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[999, 960], metavar=("W", "H"))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--crop", type=int, default=256, help="side of the crop for the memory figures")
    p.add_argument("--quick", action="store_true", help="toy size: 96×80, N = 2 and 5, 1 round, small backbones")
    args = p.parse_args()
    if args.quick:
        args.size, args.steps, args.repeats, args.crop = [96, 80], [2, 5], 1, 32
    torch.set_num_threads(args.threads)
    w, h = args.size
    u, v = fields(w, h)
    print(f"map {w}x{h} (W x H), {args.threads} thread(s), {args.repeats} round(s), torch {torch.__version__}")

    # 1. differences: slices against convolutions
    weights = [float(c) for c in central_difference_weights(8)]
    kernel = torch.tensor(weights).view(1, 1, 1, -1)
    slices, conv = AnisotropicDiffusion(), ConvDiffusion()
    gap = max((central_difference(u, d, weights) - conv_difference(u, d, kernel)).abs().max().item() for d in (-1, -2))
    gap = max(gap, (slices(u, v) - conv(u, v)).abs().max().item())
    if gap > 1e-4:
        print(f"FAIL: the two differences disagree by {gap:.2e}")
        return 1
    rows = []
    with torch.no_grad():
        for label, a, b in (("∂u/∂x and ∂u/∂y", lambda: [central_difference(u, d, weights) for d in (-1, -2)],
                             lambda: [conv_difference(u, d, kernel) for d in (-1, -2)]),
                            ("ReLU(∇·(D∇u)), one evaluation", lambda: slices(u, v), lambda: conv(u, v))):
            a(), b()  # warm-up
            ta, tb = [], []
            for _ in range(max(5, args.repeats)):
                ta.append(timed(a, 1))
                tb.append(timed(b, 1))
            rows.append((label, statistics.median(ta), statistics.median(tb)))
    print("\ncentral differences of order 8, replicate padding (max difference between the two: "
          f"{gap:.1e}):")
    print(f"| {'what':32s} | slices ms | conv2d ms | conv / slices |")
    print(f"|{'-' * 34}|-----------|-----------|---------------|")
    for label, ta, tb in rows:
        print(f"| {label:32s} | {ta * 1e3:9.2f} | {tb * 1e3:9.2f} | {tb / ta:13.2f} |")

    # 2. the solver against one forward pass of each backbone
    x = torch.rand(1, 3, w, h)
    nets = {name: (cls(features=[max(2, f // 8) for f in feats]) if args.quick else cls(features=feats)).eval()
            for name, (cls, feats) in BACKBONES.items()}
    times: dict[str, list[float]] = {}
    with torch.no_grad():
        for net in nets.values():
            net(x[..., :64, :64])  # warm-up
        for r in range(args.repeats):
            for name, net in nets.items():
                times.setdefault(name, []).append(timed(lambda net=net: net(x), 1))
            for n in args.steps:
                times.setdefault(f"solver, N = {n}", []).append(
                    timed(lambda n=n: rk4(lambda z: slices(z, v), u, 0.1, n), 1))
    full = statistics.median(times[FULL_WIDTH])
    toy = " (toy widths)" if args.quick else ""
    print(f"\nsolver (RK4, Δt 0.1, order 8) against one whole-image forward pass, no gradients{toy}:")
    print(f"| {'what':40s} | parameters | s (median) | / full-width U-Net |")
    print(f"|{'-' * 42}|------------|------------|--------------------|")
    for name, t in times.items():
        params = sum(q.numel() for q in nets[name].parameters()) if name in nets else 0
        print(f"| {name:40s} | {params:10,d} | {statistics.median(t):10.3f} | {statistics.median(t) / full:18.3f} |")
    hundred = times.get("solver, N = 100")
    if hundred:
        ratio = statistics.median(hundred) / full
        print(f"target N = 100 under one full-width U-Net forward pass: {ratio:.2f}x, "
              f"{'met' if ratio < 1 else 'NOT met'}")

    # 3. memory kept for the backward pass through N steps, with and without recomputation
    refiner = DiffusionRefiner(DropoutUNet(features=[4, 8, 8, 16, 16]), direction_kernel=9,
                               steps=max(args.steps[0], 2)).train()
    crop = torch.rand(1, 3, args.crop, args.crop)
    print(f"\nsaved for backpropagation through N = {refiner.steps} steps on a {args.crop}x{args.crop} crop "
          "(one image; a batch multiplies it):")
    print("| checkpoint_steps | MB saved | per step, maps of the crop's size |")
    print("|------------------|----------|-----------------------------------|")
    for checkpoint_steps in (True, False):
        refiner.checkpoint_steps = checkpoint_steps
        saved = [0]

        def pack(t, saved=saved):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = refiner(crop)
        out[:, 1].sum().backward()
        maps = saved[0] / (4 * args.crop * args.crop) / refiner.steps
        print(f"| {str(checkpoint_steps):16s} | {saved[0] / 2**20:8.1f} | {maps:33.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
