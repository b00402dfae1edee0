"""
The benchmarks run as a user runs them, at toy size: each exits 0 and prints its summary, with finite, positive
figures. (``large_frame.py``, ``study.py`` and ``dti.py`` are run by test_inference.py, test_study.py and test_dti.py.)
"""

from __future__ import annotations

import math
import re

import pytest
from conftest import run_benchmark

# the tests' tiny network at 32 px, on one thread: a few seconds each, most of it importing MONAI
TOY = ["--image-size", "32", "--features", "4", "8", "8", "16", "16", "--threads", "1"]


def figure(pattern: str, text: str) -> float:
    """The number the regular expression's group captures in ``text``; it must be finite and positive."""
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matches {pattern!r} in:\n{text[-3000:]}"
    value = float(match.group(1))
    assert math.isfinite(value) and value > 0, match.group(0)
    return value


@pytest.mark.parametrize("overlay", [[], ["--overlay", "configs/loss/dice.yaml"]], ids=["adaptive", "dice"])
def test_train_throughput(demo, overlay, monkeypatch, capsys):
    argv = ["--dataset-dir", str(demo), *TOY, "--batch-size", "8", "--num-workers", "0", "--rounds", "1",
            "--max-images", "16", *overlay]
    out = run_benchmark("train_throughput.py", argv, monkeypatch, capsys)
    assert f"loss {'DiceLoss' if overlay else 'AdaptivePolyDiceLoss'} |" in out
    for side in ("bundle", "plain"):
        figure(rf"^{side}\s+\S+\s+(\S+)\s", out)  # images/s
    figure(r"^ratio bundle/plain epoch time: (\S+) ", out)
    figure(r"^  epoch\s+(\S+)", out)  # the bundle's column of the per-epoch table
    figure(r"^    train#checkpoint_saver \(every epoch\)\s+(\S+)", out)  # a handler the profiler timed
    # the adaptive default times one difficulty pass, outside the epochs; the Dice baseline has none
    if overlay:
        assert "difficulty pass" not in out
    else:
        figure(r"^difficulty pass at epoch 2 .*: (\S+) s,", out)
        figure(r"one pass every 10 epochs: (\S+)x", out)


def test_mc_pass(monkeypatch, capsys):
    # the bundle's network (a split) and a MONAI overlay (batched full passes), side by side
    out = run_benchmark("mc_pass.py", ["--networks", "bundle", "basic_unet", "--image-size", "32", "--threads", "1",
                                       "--images", "2", "--batch-size", "2", "--samples", "2", "--repeats", "1"],
                        monkeypatch, capsys)
    for kind in ("sampler", "batched full passes", "sequential passes", "training epoch"):
        figure(rf"^  {kind}\s+(\S+) s/image", out)
    figure(r"batched full passes / split (\S+)x", out)
    for network, sampler in (("bundle", "split"), ("basic_unet", "batched full passes")):
        figure(rf"^\| {network} \| (\S+) M \| {sampler} \|", out)
        figure(rf"^\| {network} \|.*?\| (\S+)x \|$", out)  # adaptive training's cost at tau = 10


def test_mc_inference(monkeypatch, capsys):
    out = run_benchmark("mc_inference.py", [*TOY, "--images", "2", "--samples", "2", "--repeats", "1"], monkeypatch,
                        capsys)
    figure(r"^\| plain \(1 forward\) \| (\S+) \|", out)
    figure(r"^\| MC dropout \(N = 2, maps\) \| (\S+) \|", out)
    figure(r"^MC / plain latency: (\S+)x", out)


def test_diffusion(monkeypatch, capsys):
    out = run_benchmark("diffusion.py", ["--quick", "--threads", "1"], monkeypatch, capsys)
    for row in ("∂u/∂x and ∂u/∂y", "ReLU(∇·(D∇u)), one evaluation"):
        figure(rf"^\| {re.escape(row)}\s+\|\s+(\S+) \|", out)
        figure(rf"^\| {re.escape(row)}\s+\|\s+\S+ \|\s+\S+ \|\s+(\S+) \|", out)
    for row in ("U-Net, full width (Table 1)", "FR U-Net, vessel widths (frunet.yaml)", "solver, N = 2",
                "solver, N = 5"):
        figure(rf"^\| {re.escape(row)}\s+\|\s+[\d,]+ \|\s+(\S+) \|", out)
    assert re.search(r"^target N = 100", out, re.MULTILINE) is None  # N = 100 is not among the toy run's steps
    saved = {flag: figure(rf"^\| {flag}\s+\|\s+(\S+) \|", out) for flag in ("True", "False")}
    assert saved["True"] < saved["False"]  # recomputing each step keeps less for the backward pass


def test_auc(monkeypatch, capsys):
    out = run_benchmark("auc.py", ["--quick"], monkeypatch, capsys)  # exits 1 if the two AUCs differ
    for kind in ("float32", "8-bit"):
        figure(rf"^\| \S+ \| {kind} \| [\d,]+ \| [\d,]+ \| (\S+) \|", out)  # the AUC
        figure(rf"^{kind}\s+map, median per image: MONAI (\S+) s", out)
        figure(rf"^{kind}\s+map, .* roc_auc (\S+) ms", out)
    figure(r"^ratio MONAI / roc_auc \(median over 2 image maps\): (\S+)x", out)
    assert re.search(r"^max abs difference: 0\.0e\+00$", out, re.MULTILINE), out  # the same bits


def test_video(monkeypatch, capsys):
    # a 6-frame video against its frames as PNGs in process, then a 1-second video in a subprocess, memory sampled
    toy = ["--image-size", "32", "--features", "[4,8,8,16,16]", "--num-workers", "0", "--threads", "1"]
    out = run_benchmark("video.py", [*toy, "--size", "64x48", "--frames", "6", "--long-seconds", "1",
                                     "--long-size", "64x48", "--long-cycle", "5", "--long-image-size", "32",
                                     "--long-features", "[4,8,8,16,16]", "--sample-interval", "0.05"],
                        monkeypatch, capsys)
    video = re.search(r"^\| network \[4,8,8,16,16\] \| video \(mp4\) \| 6 \| (\S+) \| (\S+) \| (\S+) \| (\S+) \| (\S+) "
                      r"\| (\S+) \| (\S+) \|$", out, re.MULTILINE)
    stills = re.search(r"^\| network \[4,8,8,16,16\] \| stills \(png\) \| 6 \| (\S+) \| (\S+) \| (\S+) "
                       r"\| - \| - \| - \| - \|$", out, re.MULTILINE)
    assert video and stills, out[-3000:]
    for value in (*video.groups(), *stills.groups()):  # seconds, setup, frames/s; the ratio and the log line's rates
        assert math.isfinite(float(value)) and float(value) > 0, (value, video.group(0), stills.group(0))
    # the long run: 25 frames; the median / largest sample of the last tenth (main RSS, workers RSS (no workers: 0),
    # main, workers and all anonymous PSS), the peaks and the growth
    cells = r" \| ".join([r"(\S+) / (\S+)"] * 5)
    last = re.search(rf"^\| 90-100% \| 23-25 \| \S+ \| {cells} \|$", out, re.MULTILINE)
    assert last, out[-3000:]
    main_rss, _, workers_rss, _, _, _, workers_anon, _, all_anon, _ = (float(v) for v in last.groups())
    assert main_rss > 0 and all_anon > 0 and workers_rss == workers_anon == 0, last.group(0)
    figure(r"^peak: main RSS (\S+) MB", out)
    figure(r"all anon PSS (\S+) MB; \d+ samples", out)
    figure(r"^command: .*; (\S+) frames/s while writing", out)
    assert re.search(r"^a line through the tenths' medians .*: main RSS \S+ MB per 1000 frames", out, re.MULTILINE), \
        out[-3000:]
