# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Dual-threshold iteration (DTI, tubular.md §2) three ways, side by side in one run, on a CHASE_DB1-sized map
(999×960, W×H): "V = {u > τ_H}; add every pixel with u > τ_L that has an 8-neighbour in V, until nothing changes".

- exact: ``scripts.transforms.DualThreshold``, one labelling pass (``scipy.ndimage.label``, 3×3 structure), called
  as a postprocessing chain calls it: a (2, H, W) float32 torch tensor [1 − u, u] in, a (1, H, W) mask out;
- max-pool loop (the seed's): ``V = (max_pool2d(V, 3, 1, 1) > 0) & (u > τ_L)`` with torch until V is unchanged,
  one iteration per pixel of growth;
- raster loop (literal): pure Python; each pass visits every pixel in raster order and adds it to V, in place, if
  it is > τ_L and has an 8-neighbour in V; passes repeat until one adds nothing (the last pass only confirms).
  It is slow, so it runs ``--raster-repeats`` times on ``--raster-crop`` (default: the whole map), each call
  abandoned after ``--raster-cap`` seconds (then reported as "> cap").

The exact and max-pool calls alternate (the order rotates each round), so machine noise hits both; the figures
are medians over rounds of the wall time per call, and of the CPU time (``time.thread_time``: what a call costs
one core, what remains of the wall time on a busy machine). The three masks must agree (the raster loop's with
the exact one on the same crop); a disagreement exits 1. Targets (the issue): exact at least 10× faster than the
max-pool loop and under 20 ms per call on one core. Torch runs on ``--threads`` threads (1:
``torch.set_num_threads(1)``); scipy's labelling is single-threaded.

Then the sliding-window inference of each vessel network on one whole image (the photograph ``--image``, or noise
of its size without the data), as ``configs/inference.yaml`` + ``configs/vessel/inference.yaml`` (+
``configs/vessel/frunet.yaml``) build them: the networks at the overlays' widths with random weights (the time does
not depend on them), MONAI's ``SlidingWindowInferer`` with the config's windows (48 px, overlap 0.25, 64 windows a
call, gaussian blending), one deterministic pass (``--mc_samples 0``); ``--sw-repeats`` alternating rounds.

The map u: with CHASE_DB1 at ``--data-dir``, the first observer's vessel mask of ``--image`` blurred (σ 1 px:
1 and 2 px wide vessels peak at 0.40 and 0.68), dimmed by a smooth random contrast field (0.35 to 1)
so that thin vessels break into stretches below τ_H and above τ_L, plus Gaussian noise (σ 0.08: scattered weak
pixels that DTI must drop), clipped to [0, 1]. Without the data: thin ridges along the zero level set of a smooth
random field in place of the mask, same treatment.

    python benchmarks/dti.py                     # CHASE_DB1-sized, 20 rounds, 1 thread
    python benchmarks/dti.py --raster-crop 480   # the raster loop on a 480×480 crop only
    python benchmarks/dti.py --quick             # toy size, seconds (as tests/test_dti.py runs it)
    python benchmarks/dti.py --sw-repeats 0      # DTI only
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
import scipy  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy import ndimage  # noqa: E402
from scripts.transforms import DualThreshold  # noqa: E402

SHARED_DATA = Path(os.environ.get("POLYP_SHARED_DATA", BUNDLE_ROOT.parent / "shared" / "data"))
EIGHT = np.ones((3, 3), dtype=bool)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA / "chase-db1",
                   help="CHASE_DB1 folder (official layout); a synthetic map is used when it has no --image mask")
    p.add_argument("--image", default="Image_01L", help="whose _1stHO.png mask makes the map")
    p.add_argument("--crop", type=int, nargs=2, metavar=("W", "H"), help="time a centred crop of the map only")
    p.add_argument("--low", type=float, default=0.3, help="τ_L")
    p.add_argument("--high", type=float, default=0.5, help="τ_H")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds of the exact and max-pool versions")
    p.add_argument("--raster-crop", type=int, help="the raster loop on a centred N×N crop only (default: all)")
    p.add_argument("--raster-repeats", type=int, default=1)
    p.add_argument("--raster-cap", type=float, default=300.0, help="seconds after which a raster call gives up")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--sw-repeats", type=int, default=3, help="rounds of sliding-window inference (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="toy size: a 96×96 crop, 3 rounds")
    args = p.parse_args()
    if args.quick:
        args.crop, args.repeats, args.sw_repeats = [96, 96], 3, 1
    if args.repeats < 1 or args.raster_repeats < 1 or args.threads < 1 or args.sw_repeats < 0:
        p.error("--repeats, --raster-repeats and --threads must be >= 1, --sw-repeats >= 0")
    return args


def normalise(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def centre_crop(u: np.ndarray, w: int, h: int) -> np.ndarray:
    top, left = max((u.shape[0] - h) // 2, 0), max((u.shape[1] - w) // 2, 0)
    return u[top:top + h, left:left + w]


def vessel_map(data_dir: Path, image: str, seed: int, crop: list[int] | None) -> tuple[np.ndarray, str]:
    """A (960, 999) float32 foreground probability map with broken thin vessels (its centred ``crop``, W H, if
    given), and where it came from."""
    rng = np.random.default_rng(seed)
    w, h = crop or (999, 960)
    mask = data_dir / f"{image}_1stHO.png"
    if mask.is_file():
        from PIL import Image

        vessels = centre_crop(np.asarray(Image.open(mask).convert("1"), dtype=np.float32), w, h)
        source = f"CHASE_DB1 {mask.name}"
    else:
        g = ndimage.gaussian_filter(rng.standard_normal((h, w)), 12)
        vessels, source = np.exp(-((g / (0.12 * g.std())) ** 2)), "synthetic ridges (no CHASE_DB1 mask found)"
    contrast = 0.35 + 0.65 * normalise(ndimage.gaussian_filter(rng.standard_normal(vessels.shape), 15))
    u = ndimage.gaussian_filter(vessels, 1.0) * contrast + 0.08 * rng.standard_normal(vessels.shape)
    return np.clip(u, 0, 1).astype(np.float32), source


def maxpool_dti(u: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, int]:
    """The seed's loop on an (H, W) map: the mask, (H, W) bool, and the number of max-pool iterations."""
    weak = u > low
    v = (u > high).float()[None, None]
    iterations = 0
    while True:
        iterations += 1
        grown = ((F.max_pool2d(v, 3, 1, 1) > 0) & weak).float()
        if torch.equal(grown, v):
            return grown[0, 0].bool(), iterations
        v = grown


def raster_dti(u: np.ndarray, low: float, high: float, cap: float) -> tuple[np.ndarray | None, int]:
    """The literal raster loop on an (H, W) map: the mask (None if it ran past ``cap`` seconds) and its passes."""
    h, w = u.shape
    row = w + 2  # flat bytearrays with a one-pixel border, so every pixel has 8 neighbours to read
    v, weak = bytearray(np.pad(u > high, 1).tobytes()), bytearray(np.pad(u > low, 1).tobytes())
    start, passes, changed = time.perf_counter(), 0, True
    while changed:
        passes, changed = passes + 1, False
        for k in range(row + 1, (h + 1) * row - 1):  # every pixel, in raster order (the border is never weak)
            if weak[k] and not v[k] and (v[k - row - 1] or v[k - row] or v[k - row + 1] or v[k - 1] or v[k + 1]
                                         or v[k + row - 1] or v[k + row] or v[k + row + 1]):
                v[k], changed = 1, True  # in place: later pixels of this pass see it
        if changed and time.perf_counter() - start > cap:
            return None, passes
    return np.frombuffer(bytes(v), dtype=bool).reshape(h + 2, w + 2)[1:-1, 1:-1], passes


def sliding_window_inference(data_dir: Path, image: str, crop: list[int] | None, repeats: int) -> None:
    """Seconds per whole image of each vessel network's sliding-window inference, side by side."""
    from monai.bundle import ConfigParser

    path = data_dir / f"{image}.jpg"
    if path.is_file():
        from PIL import Image

        photo = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        source = f"CHASE_DB1 {path.name}"
    else:
        photo, source = np.random.default_rng(0).random((960, 999, 3), dtype=np.float32), "noise"
    photo = centre_crop(photo, *(crop or photo.shape[1::-1]))
    x = torch.from_numpy(photo.transpose(2, 1, 0).copy())[None]  # (1, 3, W, H), the bundle's axis order
    base = [str(BUNDLE_ROOT / "configs" / c) for c in ("inference.yaml", "vessel/inference.yaml")]
    runs = {}
    frunet = [str(BUNDLE_ROOT / "configs/vessel/frunet.yaml")]
    for name, overlays in (("U-Net (configs/vessel/unet.yaml)", []), ("FR U-Net (configs/vessel/frunet.yaml)", frunet)):
        parser = ConfigParser()
        parser.read_config(base + overlays)
        parser["bundle_root"] = str(BUNDLE_ROOT)
        net = parser.get_parsed_content("network_def").eval()
        params = sum(q.numel() for q in net.parameters())
        runs[name] = (net, parser.get_parsed_content("sliding_window"), params, [], [])
    with torch.no_grad():
        for net, window, *_ in runs.values():
            window(x[..., :96, :96], net)  # warm-up
        for r in range(repeats):
            for name in list(runs)[r % 2:] + list(runs)[:r % 2]:
                net, window, _, wall, cpu = runs[name]
                w0, c0 = time.perf_counter(), time.thread_time()
                window(x, net)
                wall.append(time.perf_counter() - w0)
                cpu.append(time.thread_time() - c0)
    print()
    print(f"sliding-window inference, one {x.shape[2]}x{x.shape[3]} image (W x H) from {source}, {repeats} round(s):")
    print(f"| {'network':40s} | parameters | s/image (median) | CPU s/image |")
    print(f"|{'-' * 42}|------------|------------------|-------------|")
    for name, (_, _, params, wall, cpu) in runs.items():
        print(f"| {name:40s} | {params:10,d} | {statistics.median(wall):16.3f} | {statistics.median(cpu):11.3f} |")
    (_, _, _, a, _), (_, _, _, b, _) = runs.values()
    print(f"FR U-Net / U-Net: {statistics.median(q / p for p, q in zip(a, b)):.2f}x wall")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    u, source = vessel_map(args.data_dir, args.image, args.seed, args.crop)
    h, w = u.shape
    probs = torch.from_numpy(np.stack([1 - u, u]))  # (2, H, W): [1 − u, u], as the bundle's pred
    u_t = probs[1].contiguous()
    dti = DualThreshold(args.low, args.high)

    def exact() -> np.ndarray:
        return dti(probs)[0].numpy().astype(bool)

    def maxpool() -> np.ndarray:
        return maxpool_dti(u_t, args.low, args.high)[0].numpy()

    print(f"torch {torch.__version__} on {torch.get_num_threads()} thread(s) (torch.set_num_threads), scipy "
          f"{scipy.__version__}, numpy {np.__version__}; map {w}x{h} (W x H) from {source}; "
          f"τ_L {args.low}, τ_H {args.high}; {args.repeats} rounds; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    mask, (_, iterations) = exact(), maxpool_dti(u_t, args.low, args.high)  # also the warm-up
    strong, weak = u > args.high, u > args.low
    print(f"map: {strong.mean():.2%} of pixels > τ_H in {ndimage.label(strong, EIGHT)[1]} components, "
          f"{weak.mean():.2%} > τ_L in {ndimage.label(weak, EIGHT)[1]}; DTI keeps {mask.mean():.2%} in "
          f"{ndimage.label(mask, EIGHT)[1]} components", flush=True)

    def timed(fn, *a) -> tuple[float, float, object]:
        """Wall and CPU (this thread's) seconds of one call, and its result: on a busy machine the CPU time is
        what the call costs one core, the wall time what it waited too."""
        w0, c0 = time.perf_counter(), time.thread_time()
        out = fn(*a)
        return time.perf_counter() - w0, time.thread_time() - c0, out

    kinds = {"exact": exact, "maxpool": maxpool}
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for r in range(args.repeats):
        for k in order[r % 2:] + order[:r % 2]:
            t, c, _ = timed(kinds[k])
            wall[k].append(t)
            cpu[k].append(c)
    agree_maxpool = np.array_equal(maxpool(), mask)

    # the raster loop, on its crop, against the exact DTI of the same crop (DTI of a crop is not a crop of DTI)
    ur = centre_crop(u, args.raster_crop, args.raster_crop) if args.raster_crop else u
    rh, rw = ur.shape
    probs_r = torch.from_numpy(np.stack([1 - ur, ur]))
    exact_r = [timed(dti, probs_r) for _ in range(args.repeats)]
    raster = []
    for _ in range(args.raster_repeats):
        raster.append(timed(raster_dti, ur, args.low, args.high, args.raster_cap))
        if raster[-1][2][0] is None:
            break
    raster_mask, passes = raster[-1][2]
    agree_raster = raster_mask is not None and np.array_equal(raster_mask, exact_r[0][2][0].numpy().astype(bool))
    wall["raster"], cpu["raster"] = [t for t, _, _ in raster], [c for _, c, _ in raster]
    wall["exact_r"], cpu["exact_r"] = [t for t, _, _ in exact_r], [c for _, c, _ in exact_r]

    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ratio = statistics.median(m / e for m, e in zip(wall["maxpool"], wall["exact"]))
    ratio_cpu = statistics.median(m / e for m, e in zip(cpu["maxpool"], cpu["exact"]))
    stopped = raster_mask is None
    rows = [("exact", "exact DTI (one labelling pass)", 1.0, w, h),
            ("maxpool", f"max-pool loop ({iterations} iterations)", ratio, w, h),
            ("raster", f"raster loop (pure Python, {passes} pass{'es' if passes != 1 else ''}"
                       f"{', stopped' if stopped else ''})", med["raster"] / med["exact_r"], rw, rh)]
    print()
    print(f"| {'method':46s} | map     | ms/call (median) | min      | max      | CPU ms/call | / exact |")
    print(f"|{'-' * 48}|---------|------------------|----------|----------|-------------|---------|")
    for k, label, q, mw, mh in rows:
        capped = ">" if k == "raster" and stopped else " "
        print(f"| {label:46s} | {f'{mw}x{mh}':7s} | {capped}{med[k] * 1e3:15.2f} | {min(wall[k]) * 1e3:8.2f} "
              f"| {max(wall[k]) * 1e3:8.2f} | {capped}{med_cpu[k] * 1e3:10.2f} | {q:7.1f} |")
    if args.raster_crop:
        print(f"(raster / exact compares against the exact DTI of the same {rw}x{rh} crop: "
              f"{med['exact_r'] * 1e3:.2f} ms/call)")
    print()
    print(f"max-pool loop / exact: {ratio:.1f}x wall, {ratio_cpu:.1f}x CPU   (target >= 10)")
    print(f"exact DTI per call:    {med['exact'] * 1e3:.2f} ms wall, {med_cpu['exact'] * 1e3:.2f} ms CPU, on "
          f"{torch.get_num_threads()} thread(s)   (target < 20 ms)")
    print(f"agree: exact = max-pool loop: {'yes' if agree_maxpool else 'NO'}; exact = raster loop: "
          f"{'not checked (stopped at the cap)' if stopped else 'yes' if agree_raster else 'NO'}")
    if args.sw_repeats:
        sliding_window_inference(args.data_dir, args.image, args.crop, args.sw_repeats)
    if not agree_maxpool or not (stopped or agree_raster):
        sys.exit(1)

if __name__ == "__main__":
    main()
