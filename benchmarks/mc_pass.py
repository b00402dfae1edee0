# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Cost of the MC-dropout difficulty pass (method.md §3): the fast pass against the naive one, and against training.

Three things are timed over the same M synthetic images, in the same run, with their repetitions interleaved (the
order rotates each round) so that machine noise hits all three:

- fast pass: ``scripts.uncertainty.mc_foreground_samples`` (the deterministic encoder once per image, the decoder
  N times with the N samples of a batch decoded together in chunks) followed by ``uncertainty_maps``;
- naive pass: ``mc_foreground_samples_naive`` (N full forward passes per batch, one after another), same maps;
- one training epoch: forward, PolyDice-1 loss (per-image ε), backward and Adam step per batch, network in train
  mode (autocast and a GradScaler on CUDA, as the bundle's trainer with ``amp``).

Both passes run as the training will run them: inside ``torch.random.fork_rng`` and ``mc_dropout`` (only dropout
sampling), under ``inference_mode``, with autocast on CUDA. The epoch here is compute only: no data loading, no
handlers (``train_throughput.py`` measures those), so a real epoch is longer and the pass/epoch ratio printed here
is an upper bound of the real one. Printed: seconds per image of each (median over rounds, with min and max), the
naive/fast speed-up (target >= 1.6), pass/epoch, and the implied cost of adaptive training with one pass every τ
epochs, ``1 + (pass/epoch)/τ`` (target <= 1.25 at τ = 10). Ratios are medians of per-round ratios.

    python benchmarks/mc_pass.py                                   # Table 1 U-Net, 224 px, N = 10, 8 images
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        python benchmarks/mc_pass.py --images 4 --threads 1            # the thesis setting, CPU-sized
    python benchmarks/mc_pass.py --image-size 96 --features 16 32 64 128 128 --images 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's `scripts` package

import torch  # noqa: E402
from scripts.losses import PolyDiceLoss  # noqa: E402
from scripts.networks import DropoutUNet  # noqa: E402
from scripts.uncertainty import (  # noqa: E402
    auto_chunk_size,
    mc_foreground_samples,
    mc_foreground_samples_naive,
    uncertainty_maps,
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--features", type=int, nargs=5, default=[64, 128, 256, 512, 512])
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=10, help="N, stochastic passes per image")
    p.add_argument("--images", type=int, default=8, help="M, images scored by each pass and trained on per epoch")
    p.add_argument("--batch-size", type=int, default=8, help="images per pass call and per training step")
    p.add_argument("--chunk-size", type=int, help="(sample, image) pairs per decode call of the fast pass "
                   "(default: the bundle's mc_chunk_size auto, scripts.uncertainty.auto_chunk_size)")
    p.add_argument("--tau", type=int, default=10, help="epochs between passes, for the overhead estimate")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each: fast pass, naive pass, epoch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 on a shared, busy CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.chunk_size is None:  # what mc_chunk_size auto chooses for this network, image size and device
        skip = torch.empty(1, args.features[0], args.image_size, args.image_size, device=args.device)
        args.chunk_size = auto_chunk_size(skip)
    for name in ("image_size", "samples", "images", "batch_size", "chunk_size", "tau", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def make_clock(device: torch.device):
    """perf_counter, after waiting for the GPU so that its queued work is charged to the right interval."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return lambda: (sync(), time.perf_counter())[1]


def synthetic_data(m: int, size: int, device: torch.device, gen: torch.Generator):
    """M noise images with a brighter disc each, and the discs as masks: (M, 3, S, S) and (M, 1, S, S)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(size // 4, 3 * size // 4, (m, 2), generator=gen)
    radius = torch.randint(max(size // 16, 1), max(size // 5, 2), (m,), generator=gen)
    masks = ((yy - centre[:, :1, None]) ** 2 + (xx - centre[:, 1:, None]) ** 2 < radius[:, None, None] ** 2)
    images = torch.rand(m, 3, size, size, generator=gen) * 0.5 + 0.5 * masks[:, None].float()
    return images.to(device), masks[:, None].float().to(device)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = DropoutUNet(features=args.features, dropout=args.dropout).to(device)
    images, masks = synthetic_data(args.images, args.image_size, device, gen)
    bs = min(args.batch_size, args.images)
    batches = [(images[i:i + bs], masks[i:i + bs]) for i in range(0, args.images, bs)]
    loss_fn = PolyDiceLoss(order=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    rng_devices = [device] if cuda else []
    clock = make_clock(device)

    def run_pass(sampler, n: int, limit: int | None = None) -> None:
        # As the training will: its random stream kept out of the pass, the maps computed from the samples.
        with torch.random.fork_rng(devices=rng_devices):
            for x, _ in batches[:limit]:
                maps = uncertainty_maps(sampler(x, n))
                del maps

    def fast(n: int = args.samples, limit: int | None = None) -> None:
        run_pass(lambda x, k: mc_foreground_samples(net, x, k, chunk_size=args.chunk_size), n, limit)

    def naive(n: int = args.samples, limit: int | None = None) -> None:
        run_pass(lambda x, k: mc_foreground_samples_naive(net, x, k), n, limit)

    def epoch(n: int = 0, limit: int | None = None) -> None:
        net.train()
        for x, y in batches[:limit]:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", enabled=cuda):
                logits = net(x)
            # the loss in float32 (it promotes half itself); one ε per image, as the adaptive training feeds it
            loss = loss_fn(logits, y, eps=torch.full((x.shape[0],), 0.25, device=device))
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    kinds = {"fast pass": fast, "naive pass": naive, "training epoch": epoch}
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, {torch.get_num_threads()} threads; "
          f"DropoutUNet features {tuple(args.features)}, dropout {args.dropout}, {args.image_size}x{args.image_size}, "
          f"N = {args.samples}, M = {args.images} images, batch {bs}, chunk {args.chunk_size}, "
          f"{args.repeats} rounds", flush=True)
    if not cuda and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print("note: glibc malloc maps every block over 32 MB afresh (page faults on each batch of full-size "
              "activations); large --chunk-size and --batch-size are slower than they need be on CPU. See "
              "benchmarks/README.md (MALLOC_MMAP_THRESHOLD_) or use --chunk-size 1.", flush=True)

    # Warm-up, untimed, on the first batch: allocator, oneDNN/cuDNN kernels, Adam state. The fast pass gets enough
    # samples for one full-size chunk (the largest allocations), the naive one 2 (its shapes do not depend on N).
    fast(min(args.samples, -(-args.chunk_size // bs)), 1)
    naive(2, 1)
    epoch(0, 1)

    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(args.repeats):
        for k in order[r % 3:] + order[:r % 3]:  # rotate, so no side always runs first (or after the epoch)
            t0 = clock()
            kinds[k]()
            times[k].append((clock() - t0) / args.images)
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.3f} s/image" for k in kinds), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    speedup = statistics.median(n / f for n, f in zip(times["naive pass"], times["fast pass"]))
    ratio_fast = statistics.median(f / e for f, e in zip(times["fast pass"], times["training epoch"]))
    ratio_naive = statistics.median(n / e for n, e in zip(times["naive pass"], times["training epoch"]))
    tau = args.tau

    print()
    print(f"| {'':38s} | s/image (median) | min    | max    |")
    print(f"|{'-' * 40}|------------------|--------|--------|")
    labels = {"fast pass": f"fast pass (encode once, {args.samples} decodes)",
              "naive pass": f"naive pass ({args.samples} full forwards)",
              "training epoch": "training epoch (fwd+loss+bwd+Adam)"}
    for k, v in times.items():
        print(f"| {labels[k]:38s} | {med[k]:16.3f} | {min(v):6.3f} | {max(v):6.3f} |")
    print()
    print(f"speed-up naive/fast:              {speedup:.2f}x   (target >= 1.6)")
    print(f"fast pass / epoch:                {ratio_fast:.2f}    -> adaptive training, one pass every {tau} "
          f"epochs: {1 + ratio_fast / tau:.3f}x the epochs' time (target <= 1.25)")
    print(f"naive pass / epoch:               {ratio_naive:.2f}    -> {1 + ratio_naive / tau:.3f}x")


if __name__ == "__main__":
    main()
