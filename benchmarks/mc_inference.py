# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Per-image latency of MC-dropout inference against plain inference, side by side in one run.

Both go through ``scripts.uncertainty.MCDropoutInferer``, the inferer of ``configs/inference.yaml``: plain is
``num_samples=0`` (one forward pass and the softmax), MC is ``num_samples=N`` (encoder once, decoder N times, and
the variance, entropy and mutual-information maps). One image per call, as the bundle's inference runs
(``batch_size: 1``); the two alternate image by image, so machine noise hits both. Data loading, resizing back and
writing files are not timed (``uncertainty.csv`` holds each frame's full time in a real run).

    python benchmarks/mc_inference.py                                   # Table 1 U-Net, 224 px, N = 10
    python benchmarks/mc_inference.py --threads 1 --images 4 --repeats 3   # on a small CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bundle's `scripts` package

import torch  # noqa: E402
from scripts.networks import DropoutUNet  # noqa: E402
from scripts.uncertainty import MCDropoutInferer, auto_chunk_size  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--features", type=int, nargs=5, default=[64, 128, 256, 512, 512])
    p.add_argument("--samples", type=int, default=10, help="N of MC inference (>= 2)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, help="default: the bundle's mc_chunk_size auto (auto_chunk_size)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.samples < 2 or args.images < 1 or args.repeats < 1:
        p.error("--samples must be >= 2, --images and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chunk = args.chunk_size or auto_chunk_size(torch.empty(1, args.features[0], args.image_size, args.image_size,
                                                           device=device))
    torch.manual_seed(0)
    net = DropoutUNet(3, 2, features=args.features, dropout=0.5).to(device).eval()
    images = torch.rand(args.images, 1, 3, args.image_size, args.image_size, device=device)
    plain, mc = MCDropoutInferer(0), MCDropoutInferer(args.samples, chunk)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed(inferer, x) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            inferer(x, net)
        sync()
        return time.perf_counter() - t0

    timed(plain, images[0]), timed(mc, images[0])  # warm-up
    times = {"plain": [], "mc": []}
    for _ in range(args.repeats):
        for x in images:
            times["plain"].append(timed(plain, x))
            times["mc"].append(timed(mc, x))
    ratios = [m / q for m, q in zip(times["mc"], times["plain"])]
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; features {tuple(args.features)}, "
          f"{args.image_size} px, N = {args.samples}, chunk {chunk}, {args.images} images x {args.repeats} rounds")
    print("| inference | s/image (median) | min | max |\n|---|---|---|---|")
    for name, label in (("plain", "plain (1 forward)"), ("mc", f"MC dropout (N = {args.samples}, maps)")):
        t = times[name]
        print(f"| {label} | {statistics.median(t):.4f} | {min(t):.4f} | {max(t):.4f} |")
    print(f"MC / plain latency: {statistics.median(ratios):.2f}x (median of per-image ratios; "
          f"{args.samples} full forwards would be about {args.samples}x)")


if __name__ == "__main__":
    main()
