# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Cost of the MC-dropout difficulty pass (method.md §3) for each network: the bundle's sampler against N sequential
forward passes, and against training.

For each network (``--networks``: ``bundle``, configs/train.yaml's DropoutUNet, and the overlays of
configs/network/, each at its CPU size unless ``--features`` is given), these are timed over the same M synthetic
images, in the same run, with their repetitions interleaved (the order rotates each round) so that machine noise
hits all of them:

- sampler: ``scripts.uncertainty.mc_foreground_samples``, what the bundle runs: the encoder-once split where the
  network has one (DropoutUNet, FlexibleUNet; the deterministic encoder once per image, the decoder N times), N·B
  full passes batched in chunks otherwise; followed by ``uncertainty_maps``;
- batched full passes (networks with a split only): the same sampler with the split hidden, so that it runs the
  N·B (sample, image) pairs as full forward passes in chunks;
- sequential passes: ``mc_foreground_samples_naive`` (N full forward passes per batch, one after another);
- one training epoch: forward, PolyDice-1 loss (per-image ε), backward and Adam step per batch, network in train
  mode (autocast and a GradScaler on CUDA, as the bundle's trainer with ``amp``).

Both passes run as the training will run them: inside ``torch.random.fork_rng`` and ``mc_dropout`` (only dropout
sampling), under ``inference_mode``, with autocast on CUDA. The epoch here is compute only: no data loading, no
handlers (``train_throughput.py`` measures those), so a real epoch is longer and the pass/epoch ratio printed here
is an upper bound of the real one. Printed per network: seconds per image of each
(median over rounds, with min and max), sequential/sampler (and full/split), pass/epoch, and the implied cost of
adaptive training with one pass every τ epochs, ``1 + (pass/epoch)/τ`` (target <= 1.25 at τ = 10); then one table
of every network. Ratios are medians of per-round ratios.

    python benchmarks/mc_pass.py                                   # Table 1 U-Net, 224 px, N = 10, 8 images
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        python benchmarks/mc_pass.py --images 4 --threads 1            # the thesis setting, CPU-sized
    python benchmarks/mc_pass.py --image-size 96 --features "[16,32,64,128,128]" --images 16
    python benchmarks/mc_pass.py --networks all --image-size 64 --images 32 --threads 1   # every overlay
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's `scripts` package

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from scripts.losses import PolyDiceLoss  # noqa: E402
from scripts.uncertainty import (  # noqa: E402
    auto_chunk_size,
    decoder_pair_bytes,
    encoder_split,
    mc_foreground_samples,
    mc_foreground_samples_naive,
    uncertainty_maps,
)

OVERLAYS = sorted(p.stem for p in (BUNDLE_ROOT / "configs" / "network").glob("*.yaml"))


class FullPasses(torch.nn.Module):
    """The network with its split hidden from the sampler, which then runs full forward passes."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["bundle"], help=f"bundle, any of {', '.join(OVERLAYS)}, or all")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--features", type=json.loads, help='the networks\' features id, as JSON (default: the config\'s, '
                   'for bundle the Table 1 widths "[64,128,256,512,512]")')
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=10, help="N, stochastic passes per image")
    p.add_argument("--images", type=int, default=8, help="M, images scored by each pass and trained on per epoch")
    p.add_argument("--batch-size", type=int, default=8, help="images per pass call and per training step")
    p.add_argument("--chunk-size", type=int, help="(sample, image) pairs per network call of the sampler "
                   "(default: the bundle's mc_chunk_size auto, scripts.uncertainty.auto_chunk_size)")
    p.add_argument("--tau", type=int, default=10, help="epochs between passes, for the overhead estimate")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each: fast pass, naive pass, epoch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 on a shared, busy CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if "all" in args.networks:
        args.networks = ["bundle", *OVERLAYS]
    for name in args.networks:
        if name != "bundle" and name not in OVERLAYS:
            p.error(f"--networks: {name} is neither bundle nor one of {', '.join(OVERLAYS)}")
    for name in ("image_size", "samples", "images", "batch_size", "tau", "repeats"):
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


def build(name: str, args) -> torch.nn.Module:
    """network_def of configs/train.yaml and the overlay ``name`` (none for ``bundle``), as a training builds it."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / "train.yaml"),
                        *([] if name == "bundle" else [str(BUNDLE_ROOT / "configs" / "network" / f"{name}.yaml")])])
    parser.update({"bundle_root": str(BUNDLE_ROOT), "dropout": args.dropout,
                   **({"features": args.features} if args.features is not None else {})})
    return parser.get_parsed_content("network_def")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
          f"{args.image_size}x{args.image_size}, N = {args.samples}, M = {args.images} images, "
          f"{args.repeats} rounds", flush=True)
    if args.device == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print("note: glibc malloc maps every block over 32 MB afresh (page faults on each batch of full-size "
              "activations); large --chunk-size and --batch-size are slower than they need be on CPU. See "
              "benchmarks/README.md (MALLOC_MMAP_THRESHOLD_) or use --chunk-size 1.", flush=True)
    summary = [measure(name, args) for name in args.networks]
    tau = args.tau
    print()
    print(f"| network | parameters | sampler | sampler s/image | sequential / sampler | full / split | "
          f"pass / epoch | adaptive training at τ = {tau} |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary:
        split = f"{row['full/split']:.2f}x" if "full/split" in row else "-"
        print(f"| {row['network']} | {row['parameters'] / 1e6:.2f} M | {row['sampler']} | {row['s/image']:.4f} | "
              f"{row['sequential/sampler']:.2f}x | {split} | {row['pass/epoch']:.2f} | "
              f"{1 + row['pass/epoch'] / tau:.3f}x |")


def measure(name: str, args) -> dict:
    """Time one network's sampler, sequential passes and a training epoch; print them; return the ratios."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    net = build(name, args).to(device)
    has_split = encoder_split(net) is not None
    chunk_size = args.chunk_size or "auto"
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
        run_pass(lambda x, k: mc_foreground_samples(net, x, k, chunk_size=chunk_size), n, limit)

    def full(n: int = args.samples, limit: int | None = None) -> None:
        run_pass(lambda x, k: mc_foreground_samples(FullPasses(net), x, k, chunk_size=chunk_size), n, limit)

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

    kinds = {"sampler": fast, **({"batched full passes": full} if has_split else {}), "sequential passes": naive,
             "training epoch": epoch}
    sampler = "split" if has_split else "batched full passes"
    params = sum(p.numel() for p in net.parameters())
    chunk = chunk_size
    if chunk_size == "auto":
        # what "auto" resolves to; on a CPU with a split, from the decoder's largest tensor for one pair, measured
        # as the sampler measures it
        pair = decoder_pair_bytes(net, images[:1]) if has_split and device.type == "cpu" else None
        chunk = f"auto = {auto_chunk_size(images[:bs], has_split, pair)} pairs" + (
            f" (decoder's largest tensor {pair / 1e6:.2f} MB a pair)" if pair else "")
    print(f"\n{name}: {type(net).__name__}, {params / 1e6:.2f} M parameters, sampler: {sampler}, batch {bs}, "
          f"chunk {chunk}", flush=True)

    # Warm-up, untimed, on the first batch: allocator, oneDNN/cuDNN kernels, Adam state.
    for k, run in kinds.items():
        run(*((2, 1) if k != "training epoch" else (0, 1)))

    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(args.repeats):
        for k in order[r % len(order):] + order[:r % len(order)]:  # rotate: no side always runs first
            t0 = clock()
            kinds[k]()
            times[k].append((clock() - t0) / args.images)
        print(f"round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.4f} s/image" for k in kinds), flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    row = {"network": name, "parameters": params, "sampler": sampler,
           "s/image": statistics.median(times["sampler"]), "sequential/sampler": ratio("sequential passes", "sampler"),
           "pass/epoch": ratio("sampler", "training epoch")}
    if has_split:
        row["full/split"] = ratio("batched full passes", "sampler")
    for k, v in times.items():
        print(f"  {k:22s} {statistics.median(v):.4f} s/image (min {min(v):.4f}, max {max(v):.4f})")
    print(f"  sequential / sampler {row['sequential/sampler']:.2f}x"
          + (f", batched full passes / split {row['full/split']:.2f}x" if has_split else "")
          + f"; pass / epoch {row['pass/epoch']:.2f} -> adaptive training at tau = {args.tau}: "
            f"{1 + row['pass/epoch'] / args.tau:.3f}x the epochs' time", flush=True)
    return row

if __name__ == "__main__":
    main()
