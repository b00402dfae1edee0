# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The vessel evaluation's AUC per image, side by side in one run: MONAI's ``monai.metrics.compute_roc_auc`` (a Python
loop over the sorted pixels), as ``scripts.metrics.FieldOfViewROCAUCMetric`` called it before, against
``scripts.metrics.roc_auc`` (two sorts and binary searches), as it calls it now, on the field-of-view pixels of real
CHASE_DB1 photographs (about 1M of the 999×960 frame). Each call is timed as the metric makes it, from the (H, W)
float64 map, the boolean label and the FOV: selecting the FOV pixels is inside both.

The score map is a deterministic stand-in for a network's foreground probability: the photograph's green channel
inverted (vessels are dark) less its local mean (σ 8 px), after a σ 1 px blur, through a logistic, as float32 (a
softmax's dtype: few ties) and rounded to 256 levels (an 8-bit probability map: every score tied with thousands).
The FOV is ``scripts.data.field_of_view`` of the photograph, the label the first observer's mask. Without the data
(``--data-dir``), a synthetic disc with random dark ridges, the label the ridges.

The two alternate image by image (the order rotates each round), ``--repeats`` rounds; the figures are the median
seconds per image of each, their ratio (MONAI / roc_auc; target >= 10) and the largest absolute difference between
the two AUCs (they should agree to the last bit: any difference above 1e-12 exits 1).

    python benchmarks/auc.py                       # 4 CHASE_DB1 images, both maps, 3 rounds, 1 thread
    python benchmarks/auc.py --images 28 --repeats 5
    python benchmarks/auc.py --quick               # toy size: one 96x96 crop, 1 round (as tests/test_benchmarks.py)
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.metrics import compute_roc_auc  # noqa: E402
from scipy import ndimage  # noqa: E402
from scripts.data import field_of_view  # noqa: E402
from scripts.metrics import roc_auc  # noqa: E402

SHARED_DATA = Path(os.environ.get("POLYP_SHARED_DATA", BUNDLE_ROOT.parent / "shared" / "data"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA / "chase-db1",
                   help="CHASE_DB1 folder (Image_NNx.jpg, Image_NNx_1stHO.png); synthetic discs when absent")
    p.add_argument("--images", type=int, default=4, help="the first N photographs (sorted by name)")
    p.add_argument("--crop", type=int, help="time a centred N×N crop of each image only")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (MONAI's argsort)")
    p.add_argument("--quick", action="store_true", help="toy size: one image, a 96×96 crop, 1 round")
    args = p.parse_args()
    if args.quick:
        args.images, args.crop, args.repeats = 1, 96, 1
    if args.images < 1 or args.repeats < 1 or args.threads < 1 or (args.crop is not None and args.crop < 8):
        p.error("--images, --repeats and --threads must be >= 1, --crop >= 8")
    return args


def score_map(photo: np.ndarray) -> np.ndarray:
    """The (H, W) float32 vesselness of an 8-bit RGB photograph, in (0, 1)."""
    inverted = 255.0 - photo[..., 1].astype(np.float64)
    smooth = ndimage.gaussian_filter(inverted, 1.0)
    detail = smooth - ndimage.gaussian_filter(inverted, 8.0)
    return (1 / (1 + np.exp(-(detail - 4) / 3))).astype(np.float32)


def synthetic(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 960×999 disc photograph with dark ridges along the zero set of a smooth random field, and the ridges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:960, :999]
    disc = (yy - 480) ** 2 + (xx - 500) ** 2 < 460 ** 2
    field = ndimage.gaussian_filter(rng.standard_normal((960, 999)), 12)
    ridges = np.abs(field) < 0.08 * field.std()
    green = np.where(disc, 120 - 50 * ndimage.gaussian_filter(ridges.astype(float), 1) + 6 * rng.standard_normal(
        (960, 999)), 2)
    photo = np.clip(np.stack([green * 1.6, green, green * 0.4], -1), 0, 255).astype(np.uint8)
    return photo, ridges & disc


def load(args: argparse.Namespace) -> tuple[list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], str]:
    """(name, photo, label, fov) of each image (the centred crop if asked), and where they came from."""
    photos = sorted(args.data_dir.glob("Image_*[0-9][LR].jpg"))[:args.images]
    if photos:
        from PIL import Image

        items = [(p.stem, np.asarray(Image.open(p).convert("RGB")),
                  np.asarray(Image.open(p.with_name(f"{p.stem}_1stHO.png")).convert("L")) > 127) for p in photos]
        source = f"CHASE_DB1 ({args.data_dir})"
    else:
        items = [(f"synthetic_{i}", *synthetic(i)) for i in range(args.images)]
        source = f"synthetic discs (no CHASE_DB1 photograph in {args.data_dir})"
    out = []
    for name, photo, label in items:
        fov = field_of_view(photo)  # of the whole photograph, then cropped as the map and label are
        if args.crop:
            h, w = label.shape
            top, left = max((h - args.crop) // 2, 0), max((w - args.crop) // 2, 0)
            box = (slice(top, top + args.crop), slice(left, left + args.crop))
            photo, label, fov = photo[box], label[box], fov[box]
        out.append((name, photo, label, fov))
    return out, source


def monai_score(p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
    """The metric's ``_score`` before: MONAI's ``compute_roc_auc`` on the FOV pixels."""
    return float(compute_roc_auc(torch.from_numpy(p[inside]), torch.from_numpy(g[inside].astype(np.float64))))


def fast_score(p: np.ndarray, g: np.ndarray, inside: np.ndarray) -> float:
    """The metric's ``_score`` now."""
    return roc_auc(p[inside], g[inside].astype(np.float64))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    images, source = load(args)
    print(f"torch {torch.__version__} on {torch.get_num_threads()} thread(s), numpy {np.__version__}; "
          f"{len(images)} image(s) from {source}{f', centred {args.crop}x{args.crop} crops' if args.crop else ''}; "
          f"{args.repeats} round(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    cases = []  # (image, map kind, p float64 as the metric holds it, label, fov)
    for name, photo, label, fov in images:
        u = score_map(photo)
        cases.append((name, "float32", u.astype(np.float64), label, fov))
        cases.append((name, "8-bit", np.round(u.astype(np.float64) * 255) / 255, label, fov))
    kinds = {"MONAI compute_roc_auc": monai_score, "roc_auc": fast_score}
    times = {k: [[] for _ in cases] for k in kinds}
    values = {k: [None] * len(cases) for k in kinds}
    order = list(kinds)
    for r in range(args.repeats):
        for i, (_, _, p, g, inside) in enumerate(cases):
            for k in order[(r + i) % 2:] + order[:(r + i) % 2]:
                t0 = time.perf_counter()
                values[k][i] = kinds[k](p, g, inside)
                times[k][i].append(time.perf_counter() - t0)
    med = {k: [statistics.median(t) for t in times[k]] for k in kinds}
    monai, fast = med["MONAI compute_roc_auc"], med["roc_auc"]
    diffs = [abs(a - b) for a, b in zip(values["MONAI compute_roc_auc"], values["roc_auc"])]
    print()
    print("| image | map | FOV pixels | distinct scores | AUC | MONAI s/image | roc_auc ms/image | MONAI / roc_auc "
          "| abs difference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (name, kind, p, g, inside) in enumerate(cases):
        print(f"| {name} | {kind} | {int(inside.sum()):,} | {len(np.unique(p[inside])):,} | {values['roc_auc'][i]:.6f} "
              f"| {monai[i]:.3g} | {fast[i] * 1e3:.3g} | {monai[i] / fast[i]:.1f}x | {diffs[i]:.1e} |")
    print()
    for kind in ("float32", "8-bit"):
        rows = [i for i, c in enumerate(cases) if c[1] == kind]
        print(f"{kind:7s} map, median per image: MONAI {statistics.median(monai[i] for i in rows):.3g} s, roc_auc "
              f"{statistics.median(fast[i] for i in rows) * 1e3:.3g} ms, ratio "
              f"{statistics.median(monai[i] / fast[i] for i in rows):.1f}x")
    ratio = statistics.median(a / b for a, b in zip(monai, fast))
    print(f"ratio MONAI / roc_auc (median over {len(cases)} image maps): {ratio:.1f}x   (target >= 10)")
    print(f"max abs difference: {max(diffs):.1e}")
    if not max(diffs) <= 1e-12:
        print("the two AUCs DISAGREE", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
