# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
What one frame costs bundle inference as the frame grows: time and peak memory of the real command
(``python -m monai.bundle run --config_file configs/inference.yaml``), run as a user runs it, once per frame size
and mode, each in a fresh process.

For each run it prints the wall time, the child's peak resident memory (``os.wait4``) and, when inference ran on
a GPU (``--device``, by default the bundle's: the first GPU if there is one), its peak GPU memory as PyTorch's
allocator counts it (``torch.cuda.max_memory_allocated``, printed by the child at exit), and, against the
smallest frame as the baseline (its run holds the start-up, the imports and the model), the seconds per
megapixel and bytes per pixel the larger frames add: constant figures down the table mean the cost grows
linearly with the pixel count. The last columns compare the cost ratio to the smallest frame with the pixel ratio.

Frames are synthetic JPEGs (smooth colour gradients with noise, quality 90); the model is a freshly initialised
``DropoutUNet`` of ``--features`` (seed 0) unless ``--ckpt-dir`` names a trained one (pass its ``--features`` and
``--image-size`` too). ``--num_workers 0``, so that all the work happens in the process that is measured. This
script itself imports only the standard library and makes frames and model in a child of its own: Linux counts
the parent's memory at ``fork`` in a child's peak (``ru_maxrss``), which would otherwise raise every figure.

    python benchmarks/large_frame.py                                  # 530x465, 3000x3000, 6000x6000; plain and MC 10
    python benchmarks/large_frame.py --sizes 530x465 6000x6000 --mc-samples 0
    python benchmarks/large_frame.py --ckpt-dir models --features 64 128 256 512 512 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
GPU_PEAK = "gpu peak bytes:"
# `python -m monai.bundle ...`, and at exit the peak GPU memory of the process, if it used a GPU
BUNDLE_WITH_GPU_PEAK = f"""
import atexit, runpy, sys, torch
atexit.register(lambda: torch.cuda.is_initialized() and print("{GPU_PEAK}", torch.cuda.max_memory_allocated()))
sys.argv[0] = "monai.bundle"
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def make_frame(path: Path, width: int, height: int, seed: int = 0) -> None:
    """A synthetic RGB JPEG of ``width`` × ``height``: smooth gradients plus noise, as hard to compress as a frame."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    frame = np.empty((height, width, 3), dtype=np.uint8)
    for row in range(0, height, 512):  # in bands, so that making a 36-megapixel frame stays small
        yy = y[row:row + 512]
        band = np.stack(np.broadcast_arrays(128 + 100 * np.sin(7 * x) * np.cos(5 * yy), 255 * x + 0 * yy,
                                            255 * yy + 0 * x), axis=-1)
        frame[row:row + 512] = (band + rng.normal(0.0, 8.0, band.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(frame).save(path, quality=90)


def fresh_model(folder: Path, features: list[int]) -> Path:
    import torch

    sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's `scripts` package
    from scripts.networks import DropoutUNet

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(DropoutUNet(3, 2, features=features, dropout=0.5).state_dict(), folder / "model.pt")
    return folder


def prepare(work: Path, sizes: list[tuple[int, int]], features: list[int] | None) -> None:
    """The frames (``work/frames_WxH/frame.jpg``) and, with ``features``, a fresh model (``work/models``)."""
    for width, height in sizes:
        folder = work / f"frames_{width}x{height}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "frame.jpg").exists():
            make_frame(folder / "frame.jpg", width, height)
    if features is not None:
        fresh_model(work / "models", features)


def run_inference(frames: Path, out: Path, ckpt_dir: Path, image_size: int, features: list[int],
                  mc_samples: int, log: Path, device: str | None = None) -> tuple[float, float, float | None]:
    """Run the bundle's inference command on ``frames``; (wall seconds, peak RSS in MB, peak GPU memory in MB or
    None without a GPU) of that process."""
    command = [sys.executable, "-c", BUNDLE_WITH_GPU_PEAK, "run", "--config_file", "configs/inference.yaml",
               "--input_dir", str(frames), "--output_dir", str(out), "--ckpt_dir", str(ckpt_dir),
               "--image_size", str(image_size), "--features", json.dumps(features), "--num_workers", "0",
               "--mc_samples", str(mc_samples), *(["--device", device] if device else [])]
    with open(log, "w") as f:
        began = time.perf_counter()
        proc = subprocess.Popen(command, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"inference exited {proc.returncode}: {' '.join(command)}\n{log.read_text()[-3000:]}")
    gpu = [line.split()[-1] for line in log.read_text().splitlines() if line.startswith(GPU_PEAK)]
    return seconds, usage.ru_maxrss / 1024, int(gpu[-1]) / 2**20 if gpu else None  # ru_maxrss: KiB on Linux


def size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size, nargs="+", default=[(530, 465), (3000, 3000), (6000, 6000)],
                   help="frame sizes WxH; the first is the baseline (default: 530x465 3000x3000 6000x6000)")
    p.add_argument("--mc-samples", type=int, nargs="+", default=[0, 10], help="modes: 0 plain, N >= 2 MC dropout")
    p.add_argument("--image-size", type=int, default=32, help="the network's input size (--image_size)")
    p.add_argument("--features", type=int, nargs=5, default=[4, 8, 8, 16, 16])
    p.add_argument("--ckpt-dir", type=Path, help="a trained model (model.pt); default: a fresh one of --features")
    p.add_argument("--device", help="inference's --device, e.g. cpu or cuda:0 (default: the bundle's)")
    p.add_argument("--repeats", type=int, default=1, help="runs per frame and mode: the median time, max peak")
    p.add_argument("--work-dir", type=Path, help="keep frames, outputs and logs here (default: a temporary dir)")
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)  # the child that makes the inputs
    args = p.parse_args()
    if args.prepare_only:
        return prepare(args.work_dir, args.sizes, None if args.ckpt_dir else args.features)
    if len(args.sizes) < 2:
        p.error("--sizes needs at least two sizes (the first is the baseline)")

    with tempfile.TemporaryDirectory(prefix="large_frame_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, __file__, "--prepare-only", "--work-dir", str(work), "--sizes",
                        *(f"{w}x{h}" for w, h in args.sizes), "--features", *map(str, args.features),
                        *(["--ckpt-dir", str(args.ckpt_dir)] if args.ckpt_dir else [])], check=True)
        ckpt_dir = args.ckpt_dir or work / "models"
        folders = [work / f"frames_{w}x{h}" for w, h in args.sizes]

        header = (f"{'mode':>6} {'frame':>11} {'Mpx':>7} {'seconds':>8} {'peak MB':>8} {'GPU MB':>8} "
                  f"{'s/Mpx above':>11} {'B/px above':>10} {'time ratio':>10} {'mem ratio':>9} {'px ratio':>8}")
        print(header, flush=True)
        for mc in args.mc_samples:
            base = None
            for (width, height), folder in zip(args.sizes, folders):
                runs = [run_inference(folder, work / f"out_{width}x{height}_mc{mc}_{r}", ckpt_dir, args.image_size,
                                      args.features, mc, work / f"log_{width}x{height}_mc{mc}_{r}.txt", args.device)
                        for r in range(args.repeats)]
                seconds = sorted(s for s, _, _ in runs)[len(runs) // 2]
                peak = max(m for _, m, _ in runs)
                gpu = max((g for _, _, g in runs if g is not None), default=None)
                gpu = f"{gpu:8.0f}" if gpu is not None else f"{'-':>8}"
                pixels = width * height
                mode = "plain" if mc == 0 else f"MC {mc}"
                if base is None:
                    base = (pixels, seconds, peak)
                    line = (f"{mode:>6} {f'{width}x{height}':>11} {pixels / 1e6:7.3f} {seconds:8.2f} {peak:8.0f} "
                            f"{gpu} {'(baseline)':>11} {'':>10} {1:10.2f} {1:9.2f} {1:8.1f}")
                else:
                    extra = max(pixels - base[0], 1)
                    line = (f"{mode:>6} {f'{width}x{height}':>11} {pixels / 1e6:7.3f} {seconds:8.2f} {peak:8.0f} "
                            f"{gpu} {(seconds - base[1]) / extra * 1e6:11.3f} {(peak - base[2]) * 2**20 / extra:10.1f} "
                            f"{seconds / base[1]:10.2f} {peak / base[2]:9.2f} {pixels / base[0]:8.1f}")
                print(line, flush=True)


if __name__ == "__main__":
    main()
