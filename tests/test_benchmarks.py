"""
The benchmarks run as a user runs them, at toy size: each exits 0 and prints its summary, with finite, positive
figures. (``large_frame.py``, ``study.py`` and ``dti.py`` are run by test_inference.py, test_study.py and test_dti.py.)
"""

from __future__ import annotations

import math
import re

import pytest
from conftest import load_benchmark, run_benchmark

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


def test_difficulty_study(demo, trained, tmp_path, monkeypatch, capsys):
    """benchmarks/difficulty.py end to end at toy size: labels broken on purpose, the signals of a trained run, the
    audit's evidence at each saved epoch, and the report's tables and figures."""
    import json

    import numpy as np
    import yaml
    from PIL import Image

    audit_data = tmp_path / "audit"
    out = run_benchmark("difficulty.py", ["corrupt", str(demo), str(audit_data), "--seed", "1", "--erased", "1",
                                          "--shifted", "1", "--swapped", "2"], monkeypatch, capsys)
    assert "1 erased, 1 shifted, 2 swapped" in out
    broken = json.loads((audit_data / "broken.json").read_text())
    original = json.loads((demo / "datalist.json").read_text())
    copy = json.loads((audit_data / "datalist.json").read_text())
    assert {k: len(v) for k, v in broken.items()} == {"erased": 1, "shifted": 1, "swapped": 2}
    labels = {(audit_data / d["label"]).resolve() for d in copy["training"]}
    assert {(audit_data / p).resolve() for paths in broken.values() for p in paths} <= labels
    assert not np.asarray(Image.open(audit_data / broken["erased"][0])).any()
    for split in ("validation", "test"):  # untouched, the same files
        assert [(audit_data / d["label"]).resolve() for d in copy[split]] == [
            (demo / d["label"]).resolve() for d in original[split]]

    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "budget": {"image_size": 32, "features": [4, 8, 8, 16, 16], "batch_size": 8, "num_workers": 0},
        "splits": {"demo": str(demo)}, "seeds": [0], "baseline": "thesis",
        "methods": {"thesis": {"label": "the tests' model", "configs": []}}}))
    audit_study = tmp_path / "audit_study.yaml"
    audit_study.write_text(study.read_text().replace(str(demo), str(audit_data)))
    runs = tmp_path / "runs"
    for output, split in ((runs, "demo"), (tmp_path / "audit_runs", "demo")):
        (output / split / "thesis" / "seed0").mkdir(parents=True)
        (output / split / "thesis" / "seed0" / "models").symlink_to(trained / "models")
    out = run_benchmark("difficulty.py", ["signals", str(study), "--output", str(runs), "--samples", "4",
                                          "--batch-size", "8"], monkeypatch, capsys)
    assert "1 finished runs" in out
    with np.load(runs / "demo" / "thesis" / "seed0" / "signals" / "training.npz") as z:
        n = len(original["training"])
        assert z["error"].shape == (n,) and ((z["error"] >= 0) & (z["error"] <= 1)).all()
        assert list(z["sizes"]) == [2, 4]
        for name in ("mi_label", "mi_prediction", "entropy_prediction", "mi_boundary", "dice_error_mean"):
            assert z[f"signal/{name}"].shape == (2, 2, n) and np.isfinite(z[f"signal/{name}"]).all(), name
        # the two halves are independent draws: they differ, and the entropy stays within [0, log 2]
        assert not np.array_equal(z["signal/mi_label"][0], z["signal/mi_label"][1])
        assert (z["signal/entropy_prediction"] <= np.log(2) + 1e-6).all()
    out = run_benchmark("difficulty.py", ["audit", str(audit_study), "--output", str(tmp_path / "audit_runs"),
                                          "--samples", "2", "--batch-size", "8"], monkeypatch, capsys)
    assert "epoch 1:" in out and "epoch 2:" in out
    report = tmp_path / "report"
    out = run_benchmark("difficulty.py", ["report", "--variants", str(study), str(runs), "--audit", str(audit_study),
                                          str(tmp_path / "audit_runs"), "--report", str(report)], monkeypatch, capsys)
    for heading in ("## Signals, Kvasir-SEG", "## Dropout variants", "## Label audit rankings"):
        assert heading in out
    # every ranking of the audit, at both saved epochs, counts the 4 broken labels of the 4 kinds' totals
    tables = json.loads((report / "tables.json").read_text())
    assert len(tables["audit"]) == 2 * 5 and all(r["total"] <= 4 and 0 < r["ap"] <= 1 for r in tables["audit"])
    assert (report / "mi_maps_kvasir.png").stat().st_size > 0 and (report / "signal_vs_error_kvasir.png").is_file()


def test_difficulty_spearman_and_audit_counts_by_hand():
    """The study's correlation equals scipy's for one seed, and its bootstrap interval contains it."""
    import numpy as np
    from scipy.stats import spearmanr

    module = load_benchmark("difficulty.py")
    rng = np.random.default_rng(0)
    x = rng.random(60)
    y = x + rng.normal(0, 0.3, 60)
    y[:5] = y[5]  # ties
    rho, low, high = module.spearman_over_seeds([x], [y], resamples=500)
    assert rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert low < rho < high
    # two seeds: the mean of the two correlations
    z = rng.random(60)
    rho2, _, _ = module.spearman_over_seeds([x, z], [y, y], resamples=50)
    assert rho2 == pytest.approx((spearmanr(x, y).statistic + spearmanr(z, y).statistic) / 2, abs=1e-12)
    # the rank quantile of the audit's product: 0 for the lowest, 1 for the highest, ties averaged
    np.testing.assert_allclose(module._quantile(np.array([0.3, 0.1, 0.1, 0.5])), [2 / 3, 1 / 6, 1 / 6, 1.0])
