# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Video inference with the bundle (``configs/inference.yaml``): frames per second of the whole pipeline against
inference on the same frames as still images, and memory on a long video.

1. Throughput. A video is generated at run time (moving shaded discs over a textured, slowly panning background,
   ``--size`` 384x288, ``--frames`` at 25 fps, H.264 through PyAV), and its decoded frames are written as still
   images (``--stills-format``, PNG by default: the same pixels). For each network of ``--features`` (by default
   the README's CPU-sized ``[8,16,32,64,64]`` and the full-width ``[64,128,256,512,512]`` of Table 1, untrained,
   at ``--image-size`` 224) the bundle's inference config runs in this process (``ConfigWorkflow``, as
   ``python -m monai.bundle run --config_file configs/inference.yaml`` runs it, on ``--threads`` 1 torch thread and
   the config's ``--num-workers`` 2 loader workers) on the video (``--input``: decode, inference, masks,
   ``frames.csv`` and ``overlay.mp4``) and on the folder of stills (``--input_dir``: masks only), side by side,
   alternating over ``--rounds``. The time of a run is the whole workflow: parsing, the checks and input scan
   (still images are read once up front), building and loading the network, the run. Printed per network and
   input: frames, seconds (median over rounds), frames/s, video/stills frames/s, and the per-stage rates of the
   bundle's own log line (``scripts.video``: decoding in the loader's workers, inference, overlay and report).

2. Memory on a long video. A ``--long-seconds`` video of ``--long-size`` (default 60 s of 1920x1080 at 25 fps,
   1500 frames) is made by encoding ``--long-cycle`` distinct frames once (one closed GOP) and repeating their
   packets with shifted timestamps, so that making it costs seconds. The real command (``python -m monai.bundle
   run``, ``OMP_NUM_THREADS`` = ``--threads``) runs on it in a subprocess with the CPU-sized network at
   ``--long-image-size`` 64, and every ``--sample-interval`` seconds this script reads the frames done (masks
   written) and the memory of the command and of its loader workers: resident set (``VmRSS``) and anonymous
   proportional set (``Pss_Anon`` + ``Pss_Shmem`` of ``/proc/<pid>/smaps_rollup``: heap and shared memory, each
   page shared by k of the processes counted 1/k in each, so their sum is what they hold together; file-backed
   pages are left out, their PSS moves whenever other programs map the same libraries). Printed: the median and
   the largest sample of each tenth of the frames, the peaks, and the growth of the tenths' medians from the second
   tenth on (least squares, MB per 1000 frames) and that rate over a 2-hour video at 25 fps (180,000 frames).
   Flat memory, growth near 0 whatever the length, is what the streaming decoder and encoder promise.
   ``--work-dir`` keeps every sample (``memory.csv``) and the command's log. Linux only (/proc).

    python benchmarks/video.py                                    # both networks, 100 frames; 60 s of 1080p
    python benchmarks/video.py --features "[8,16,32,64,64]" --frames 250 --rounds 3
    python benchmarks/video.py --long-seconds 0                   # throughput only
    python benchmarks/video.py --size 64x48 --frames 6 --image-size 32 --features "[4,8,8,16,16]" --num-workers 0 \\
        --long-seconds 2 --long-size 96x64 --long-image-size 32 --long-features "[4,8,8,16,16]"   # toy size
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))  # the configs' `scripts.*` imports

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

CPU_SIZED = [8, 16, 32, 64, 64]
FULL_WIDTH = [64, 128, 256, 512, 512]
NAMES = {tuple(CPU_SIZED): "CPU-sized", tuple(FULL_WIDTH): "full width"}
RATE_LINE = re.compile(r"(\d+) video frames: decoding (\S+) frames/s, inference (\S+) frames/s, "
                       r"overlay and report (\S+) frames/s")
TWO_HOURS = 2 * 3600 * 25  # frames of the case: a 2-hour video at 25 fps
# the in-process runs log warnings only (to stderr), and the bundle's rate line; the tables go to stdout
QUIET_LOGGING = """[loggers]
keys=root
[handlers]
keys=stderr
[formatters]
keys=plain
[logger_root]
level=WARNING
handlers=stderr
[handler_stderr]
class=StreamHandler
args=(sys.stderr,)
formatter=plain
[formatter_plain]
format=%(name)s - %(levelname)s - %(message)s
"""


# ---------------------------------------------------------------------------------------------------- the video

class Scene:
    """Shaded discs (polyp-like) moving over a textured, slowly panning pink background; frame ``i`` as (H, W, 3)."""

    def __init__(self, width: int, height: int, fps: float = 25.0, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.width, self.height, self.fps = width, height, fps
        self.pad = max(2, min(width, height) // 10)
        h, w = height + 2 * self.pad, width + 2 * self.pad
        coarse = rng.normal(0.0, 1.0, (max(2, h // 24), max(2, w // 24), 3)).astype(np.float32)
        smooth = np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.BICUBIC))
                           for c in coarse.transpose(2, 0, 1)], axis=-1)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        light = 0.75 + 0.25 * np.cos(3 * xx / w) * np.cos(2 * yy / h)
        base = np.array([175.0, 90.0, 85.0], np.float32) * light[..., None]
        fine = rng.normal(0.0, 5.0, (h, w, 3)).astype(np.float32)
        self.background = (base + 18 * smooth + fine).clip(0, 255).astype(np.uint8)
        self.discs = [(rng.uniform(0.07, 0.16) * min(width, height), rng.uniform(3, 7), rng.uniform(0, 2 * np.pi),
                       np.array([rng.uniform(200, 240), rng.uniform(110, 150), rng.uniform(90, 120)], np.float32))
                      for _ in range(3)]

    def frame(self, i: int) -> np.ndarray:
        t = i / self.fps
        ox = self.pad + round(self.pad * 0.9 * math.sin(2 * math.pi * t / 8))
        oy = self.pad + round(self.pad * 0.9 * math.cos(2 * math.pi * t / 11))
        out = self.background[oy:oy + self.height, ox:ox + self.width].copy()
        for radius, period, phase, colour in self.discs:
            cx = self.width * (0.5 + 0.32 * math.sin(2 * math.pi * t / period + phase))
            cy = self.height * (0.5 + 0.3 * math.sin(2 * math.pi * t / (1.3 * period) + 2 * phase))
            x0, x1 = max(0, int(cx - radius)), min(self.width, int(cx + radius) + 1)
            y0, y1 = max(0, int(cy - radius)), min(self.height, int(cy + radius) + 1)
            if x0 >= x1 or y0 >= y1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / radius
            inside = d < 1
            shade = (1.1 - 0.4 * d)[..., None] * colour
            patch = out[y0:y1, x0:x1]
            patch[inside] = shade[inside].clip(0, 255).astype(np.uint8)
        return out


def _stream(container, width: int, height: int, fps: int, gop: int | None = None):
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    # with ``gop``: one closed GOP of that many frames, no B-frames (packets in frame order), to be repeated
    stream.options = {"preset": "veryfast", "crf": "23", **({"g": str(gop), "keyint_min": str(gop), "bf": "0",
                                                            "sc_threshold": "0"} if gop else {})}
    return stream


def make_video(path: Path, frames: int, width: int, height: int, fps: int = 25, cycle: int | None = None) -> None:
    """
    An H.264 MP4 of ``frames`` frames of :class:`Scene`. With ``cycle``, only that many distinct frames are encoded
    (one closed GOP) and their packets repeated with shifted timestamps: a long video in seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = Scene(width, height, fps)
    distinct = min(frames, cycle) if cycle else frames
    with av.open(str(path), "w") as container:
        stream = _stream(container, width, height, fps, gop=distinct if cycle else None)
        packets = []
        for i in range(distinct + 1):
            frame = None
            if i < distinct:
                frame = av.VideoFrame.from_ndarray(scene.frame(i), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                if cycle:
                    packets.append((bytes(packet), packet.pts, packet.dts, packet.is_keyframe, packet.time_base))
                container.mux(packet)
        for start in range(distinct, frames, distinct):  # the cycle again, as long as frames remain
            for data, pts, dts, key, time_base in packets:
                if pts - packets[0][1] >= frames - start:  # a last, partial cycle: its first frames only
                    break  # (no B-frames: the packets are in frame order, each refers to earlier ones only)
                packet = av.Packet(data)
                packet.time_base, packet.pts, packet.dts = time_base, pts + start, dts + start
                packet.stream, packet.is_keyframe = stream, key
                container.mux(packet)


def write_stills(video: Path, folder: Path, fmt: str) -> int:
    """The video's frames as decoded, one still image each (``frame_000000.png``, ...); returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    with av.open(str(video)) as container:
        for frame in container.decode(video=0):
            image = Image.fromarray(frame.to_ndarray(format="rgb24"))
            image.save(folder / f"frame_{n:06d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
            n += 1
    return n


def fresh_model(folder: Path, features: list[int]) -> Path:
    """An untrained ``DropoutUNet`` of ``features`` (seed 0) as ``folder/model.pt``; no run.json: shapes checked."""
    from scripts.networks import DropoutUNet

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(DropoutUNet(3, 2, features=features, dropout=0.5).state_dict(), folder / "model.pt")
    return folder


# ---------------------------------------------------------------------------------------------------- in process

class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_in_process(work: Path, name: str, models: Path, source: dict, features: list[int], args) -> dict:
    """
    The bundle's inference workflow on one input (``{"input": video}`` or ``{"input_dir": folder}``), in this
    process; the wall time of the whole workflow, the frames written and the rates of the ``scripts.video`` line.
    """
    from monai.bundle import ConfigWorkflow

    out = work / "out" / name
    shutil.rmtree(out, ignore_errors=True)
    logging_file = work / "logging.conf"
    logging_file.write_text(QUIET_LOGGING)
    overrides = dict(bundle_root=str(BUNDLE_ROOT), output_dir=str(out), ckpt_dir=str(models),
                     image_size=args.image_size, features=features, num_workers=args.num_workers, device=args.device,
                     **{k: str(v) for k, v in source.items()})
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    captured = _Lines()
    video_logger = logging.getLogger("scripts.video")  # its rate line, at INFO; the rest of the log at WARNING
    level = video_logger.level
    root = logging.getLogger()
    root_state = root.level, root.handlers[:]  # the logging file replaces them: restored after, for the caller
    try:
        began = time.perf_counter()
        workflow = ConfigWorkflow(config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"), workflow_type=None,
                                  logging_file=str(logging_file), **overrides)
        video_logger.setLevel(logging.INFO)
        video_logger.addHandler(captured)
        workflow.initialize()
        setup = time.perf_counter() - began
        workflow.run()
        workflow.finalize()
        seconds = time.perf_counter() - began
    finally:
        video_logger.removeHandler(captured)
        video_logger.setLevel(level)
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        os.chdir(cwd)
    masks = sum(1 for _ in out.rglob("*_mask.png"))
    record = {"seconds": seconds, "setup": setup, "frames": masks, "rates": None}
    for line in captured.lines:
        match = RATE_LINE.search(line)
        if match:
            record["rates"] = tuple(float(v) if v != "-" else math.nan for v in match.groups()[1:])
    return record


# ---------------------------------------------------------------------------------------------------- memory

def _status_kb(pid: int, field: str, file: str = "status") -> int | None:
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _count_masks(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.name.endswith("_mask.png"))
    except OSError:
        return 0


def long_run(work: Path, args) -> None:
    width, height = args.long_size
    frames = max(1, round(args.long_seconds * 25))
    video = work / "long" / "long.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    make_video(video, frames, width, height, cycle=args.long_cycle)
    made = time.perf_counter() - began
    models = fresh_model(work / "models" / "long", args.long_features)
    out = work / "out" / "long"
    shutil.rmtree(out, ignore_errors=True)  # masks of an earlier run in --work-dir would count as frames done
    log = work / "long.log"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--input", str(video), "--output_dir", str(out), "--ckpt_dir", str(models),
               "--image_size", str(args.long_image_size), "--features", json.dumps(args.long_features),
               "--num_workers", str(args.num_workers), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    samples = []  # one dict a sample, memory in kB
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            sample = _sample(proc.pid)
            if sample is not None:
                samples.append({"seconds": time.perf_counter() - start, "frames": _count_masks(out / "long"),
                                **sample})
            time.sleep(args.sample_interval)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"inference exited {proc.returncode}: {' '.join(command)}\n{text[-3000:]}")
    done = _count_masks(out / "long")
    if done != frames:
        sys.exit(f"the long run wrote {done} masks for {frames} frames; see {log}")
    if not samples:
        sys.exit("no memory sample was taken (the command ended at once?)")
    with open(work / "memory.csv", "w") as f:
        f.write(",".join(samples[0]) + "\n")
        f.writelines(",".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in s.values()) + "\n"
                     for s in samples)
    report_memory(samples, frames, seconds, RATE_LINE.search(text), made, args)
    if args.work_dir:
        print(f"samples: {work / 'memory.csv'}, the command's log: {log}")


MEMORY = (("main_rss", "main RSS"), ("workers_rss", "workers RSS"), ("main_anon", "main anon PSS"),
          ("workers_anon", "workers anon PSS"), ("all_anon", "all anon PSS"))


def _sample(pid: int) -> dict | None:
    """
    Memory of the command (``pid``) and of its descendants, the loader's workers, in kB; None once it is gone. RSS
    counts every page a process maps; anonymous PSS (``Pss_Anon`` + ``Pss_Shmem``: heap, and the shared memory the
    workers hand tensors over in) divides the pages the processes share among them, so the processes' sum is what
    they hold together. File-backed pages (libtorch, ...) are left out of it: their PSS changes whenever other
    programs on the machine map the same libraries.
    """
    main_rss = _status_kb(pid, "VmRSS")
    if main_rss is None:
        return None
    children = _descendants(pid)
    anon = lambda p: (_status_kb(p, "Pss_Anon", "smaps_rollup") or 0) + (_status_kb(p, "Pss_Shmem", "smaps_rollup")
                                                                          or 0)  # noqa: E731
    main_anon = anon(pid)
    workers_anon = sum(anon(c) for c in children)
    return {"main_rss": main_rss, "workers_rss": sum(_status_kb(c, "VmRSS") or 0 for c in children),
            "main_anon": main_anon, "workers_anon": workers_anon, "all_anon": main_anon + workers_anon,
            "workers": len(children)}


def report_memory(samples: list[dict], frames: int, seconds: float, match, made: float, args) -> None:
    """The long run's table: the largest memory of each tenth of the frames, the peaks and the growth."""
    width, height = args.long_size
    mb = lambda kb: kb / 1024  # noqa: E731
    first = next((s for s in samples if s["frames"] > 0), None)
    last = next((s for s in samples if s["frames"] >= frames), samples[-1])
    steady = (f"{(last['frames'] - first['frames']) / (last['seconds'] - first['seconds']):.2f}"
              if first and last["seconds"] > first["seconds"] else "-")
    print(f"\n=== memory on a long video: {args.long_seconds:g} s of {width}x{height} at 25 fps ({frames} frames, "
          f"made in {made:.1f} s), features {json.dumps(args.long_features).replace(' ', '')}, {args.long_image_size} "
          f"px, {args.threads} thread(s), {args.num_workers} loader workers, {args.device}; the real command "
          "(`python -m monai.bundle run`) in a subprocess ===")
    print(f"command: {seconds:.1f} s with start-up and exit; {steady} frames/s while writing (samples); bundle log: "
          + (f"decoding {match.group(2)}, inference {match.group(3)}, overlay and report {match.group(4)} frames/s"
             if match else "no rate line"))
    print("median / largest sample of each tenth of the frames (by masks written; the last tenth holds the end of "
          "the run):")
    print(f"| tenth | frames | seconds | {' | '.join(f'{label} MB' for _, label in MEMORY)} |\n"
          f"|{'---|' * (3 + len(MEMORY))}")
    medians = []  # (middle frame of the tenth, {key: median MB})
    for tenth in range(10):
        low, high = tenth * frames // 10 + 1, (tenth + 1) * frames // 10
        part = [s for s in samples if low <= s["frames"] <= high and s["frames"] > 0]
        label = f"{10 * tenth}-{10 * tenth + 10}%"
        if not part:
            print(f"| {label} | {low}-{high} | {' | '.join('-' * (1 + len(MEMORY)))} |")
            continue
        median = {key: mb(statistics.median(s[key] for s in part)) for key, _ in MEMORY}
        if tenth > 0:  # the first tenth holds the start-up's growth
            medians.append(((low + high) / 2, median))
        print(f"| {label} | {low}-{high} | {part[0]['seconds']:.1f}-{part[-1]['seconds']:.1f} | "
              + " | ".join(f"{median[key]:.0f} / {mb(max(s[key] for s in part)):.0f}" for key, _ in MEMORY) + " |")
    print("peak: " + ", ".join(f"{label} {mb(max(s[key] for s in samples)):.0f} MB" for key, label in MEMORY)
          + f"; {len(samples)} samples, every {args.sample_interval:g} s")
    if len(medians) >= 3:
        # the tenths' medians, not the samples: the allocator's saw-tooth (a freed frame buffer returned to the
        # system or not) moves single samples by tens of MB over hundreds of frames, which a line through them
        # would read as growth or shrinking
        x = np.array([m for m, _ in medians])
        keys = (("main_rss", "main RSS"), ("all_anon", "all anon PSS"))
        first = [median for m, median in medians if m <= frames / 2]
        second = [median for m, median in medians if m > frames / 2]
        if first and second:
            change = lambda key: (statistics.median(t[key] for t in second)  # noqa: E731
                                  - statistics.median(t[key] for t in first))
            print("second half against the first (median of the tenths' medians, tenths 6-10 less tenths 2-5): "
                  + ", ".join(f"{label} {change(key):+.0f} MB" for key, label in keys))
        fits = []
        for key, label in keys:
            slope = np.polyfit(x, np.array([median[key] for _, median in medians]), 1)[0]  # MB a frame
            fits.append(f"{label} {slope * 1000:+.2f} MB per 1000 frames ({slope * TWO_HOURS:+.0f} MB at that rate "
                        f"over {TWO_HOURS} frames, 2 hours at 25 fps)")
        print(f"a line through the tenths' medians from the second tenth on ({len(medians)} tenths): "
              + "; ".join(fits))
    else:
        print("growth: too few tenths of the frames sampled (a longer --long-seconds or a shorter --sample-interval)")


# ---------------------------------------------------------------------------------------------------- main

def throughput(work: Path, args) -> None:
    width, height = args.size
    video = work / "clip.mp4"  # --input names this one file; the stills are an --input_dir of their own
    make_video(video, args.frames, width, height)
    stills = work / "stills"
    n = write_stills(video, stills, args.stills_format)
    if n != args.frames:
        sys.exit(f"the generated video decodes to {n} frames, not {args.frames}")
    warm = work / "warm"
    make_video(warm / "warm.mp4", 2, width, height)
    write_stills(warm / "warm.mp4", warm / "stills", args.stills_format)

    results = {}
    for k, features in enumerate(args.features):
        tag = f"net{k}"
        models = fresh_model(work / "models" / tag, features)
        # warm-up: the first run of a network in this process pays lazy imports and allocator growth
        run_in_process(work, f"{tag}_warm_video", models, {"input": warm / "warm.mp4"}, features, args)
        run_in_process(work, f"{tag}_warm_stills", models, {"input_dir": warm / "stills"}, features, args)
        runs = {"video": [], "stills": []}
        for r in range(args.rounds):
            order = ("video", "stills") if r % 2 == 0 else ("stills", "video")
            for kind in order:
                source = {"input": video} if kind == "video" else {"input_dir": stills}
                record = run_in_process(work, f"{tag}_{kind}_{r}", models, source, features, args)
                if record["frames"] != args.frames:
                    sys.exit(f"{kind} inference wrote {record['frames']} masks for {args.frames} frames")
                if kind == "video" and record["rates"] is None:
                    sys.exit("no 'N video frames: decoding ...' line from scripts.video in the video run")
                runs[kind].append(record)
        results[tag] = runs

    print(f"\n=== video pipeline vs still images: {args.frames} frames of {width}x{height}, 25 fps H.264 "
          f"(libx264 veryfast, crf 23) vs the same frames as {args.stills_format.upper()} files; {args.image_size} px, "
          f"{torch.get_num_threads()} torch thread(s), {args.num_workers} loader workers, {args.device}, "
          f"torch {torch.__version__}, PyAV {av.__version__}; median of {args.rounds} round(s) after a warm-up ===")
    print("| network | input | frames | seconds | setup s | frames/s | video / stills | decode frames/s "
          "| inference frames/s | overlay+report frames/s |\n|---|---|---|---|---|---|---|---|---|---|")
    for k, features in enumerate(args.features):
        runs = results[f"net{k}"]
        name = f"{NAMES.get(tuple(features), 'network')} {json.dumps(features).replace(' ', '')}"
        seconds = {kind: statistics.median(r["seconds"] for r in runs[kind]) for kind in runs}
        setup = {kind: statistics.median(r["setup"] for r in runs[kind]) for kind in runs}
        fps = {kind: args.frames / seconds[kind] for kind in runs}
        rates = [statistics.median(r["rates"][i] for r in runs["video"]) for i in range(3)]
        print(f"| {name} | video (mp4) | {args.frames} | {seconds['video']:.2f} | {setup['video']:.2f} | "
              f"{fps['video']:.2f} | {fps['video'] / fps['stills']:.2f} | {' | '.join(f'{v:.1f}' for v in rates)} |")
        print(f"| {name} | stills ({args.stills_format}) | {args.frames} | {seconds['stills']:.2f} | "
              f"{setup['stills']:.2f} | {fps['stills']:.2f} | - | - | - | - |")


def size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=size, default=(384, 288), help="frame size WxH of the throughput video")
    p.add_argument("--frames", type=int, default=100, help="frames of the throughput video (25 fps); 0: none")
    p.add_argument("--features", type=json.loads, nargs="+", default=[CPU_SIZED, FULL_WIDTH],
                   help="one network per JSON list (default: the CPU-sized and the full-width U-Net)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--stills-format", choices=("png", "jpg"), default="png",
                   help="the still images: png (the video's decoded pixels exactly) or jpg (quality 90)")
    p.add_argument("--rounds", type=int, default=1, help="video and stills runs per network, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS of the long run)")
    p.add_argument("--num-workers", type=int, default=2, help="the loader's workers (--num_workers; the config's 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--long-seconds", type=float, default=60.0, help="length of the long video; 0: no memory run")
    p.add_argument("--long-size", type=size, default=(1920, 1080))
    p.add_argument("--long-cycle", type=int, default=50, help="distinct frames of the long video, repeated")
    p.add_argument("--long-image-size", type=int, default=64)
    p.add_argument("--long-features", type=json.loads, default=CPU_SIZED)
    p.add_argument("--sample-interval", type=float, default=0.25, help="seconds between memory samples")
    p.add_argument("--work-dir", type=Path, help="keep videos, outputs and logs here (default: a temporary dir)")
    args = p.parse_args()
    if args.frames < 0 or args.rounds < 1 or args.threads < 1 or args.long_cycle < 1:
        p.error("--rounds, --threads and --long-cycle must be >= 1, --frames >= 0 (0: no throughput runs)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="video_bench_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.frames:
            throughput(work, args)
        if args.long_seconds > 0:
            long_run(work, args)


if __name__ == "__main__":
    main()
