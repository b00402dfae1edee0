"""The figures of scripts/figures.py from synthetic MC-pass outputs in the formats the difficulty handler writes."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from scripts.figures import _display, choose_images, plot_uncertainty_evolution, write_figures

K, WIDTH, HEIGHT = 4, 48, 32  # stored as (K, WIDTH, HEIGHT): axis 0 of the spatial axes is the frame's width
EPOCHS = (1, 6, 11)
IDS = [f"/data/kvasir/images/img_{i}.jpg" for i in range(10)]
MAP_IDS = IDS[:K]  # the fixed subset whose maps are saved
# last pass's D: among the subset img_2 is hardest (highest D), img_1 easiest; img_9 (not in the subset) beats both
LAST_D = [0.05, 0.01, 0.30, 0.10, 0.2, 0.2, 0.2, 0.2, 0.2, 0.9]


def _maps(k: int) -> dict[str, np.ndarray]:
    """Pass ``k`` (1-based) of the subset: a disc label, maps that sharpen as the passes go on."""
    x, y = np.meshgrid(np.arange(WIDTH), np.arange(HEIGHT), indexing="ij")  # (WIDTH, HEIGHT)
    label = ((x - 30) ** 2 + (y - 12) ** 2 <= 8**2).astype(np.uint8)
    image = np.full((K, 3, WIDTH, HEIGHT), 0.3, np.float32)
    image[:, 0, :, :4] = 1.0  # a red stripe along the top of the displayed frame
    image[:, 1, :4, :] = 1.0  # a green stripe along its left side
    sharpness = 2.0 * k
    dist = np.sqrt((x - 30) ** 2 + (y - 12) ** 2) - 8
    mean = np.stack([1 / (1 + np.exp(sharpness * dist / (i + 1))) for i in range(K)]).astype(np.float32)
    entropy = -(mean * np.log(mean + 1e-12) + (1 - mean) * np.log(1 - mean + 1e-12))
    return {
        "ids": np.array(MAP_IDS), "epoch": np.array(EPOCHS[k - 1]), "image": image,
        "label": np.repeat(label[None], K, 0),
        "mean": mean, "variance": (0.25 * mean * (1 - mean) * 4 / k).astype(np.float32),
        "entropy": entropy.astype(np.float32), "mutual_information": (entropy / (k + 1)).astype(np.float32),
    }


@pytest.fixture()
def run_dir(tmp_path):
    (tmp_path / "mc_maps").mkdir()
    for k in range(1, len(EPOCHS) + 1):
        np.savez(tmp_path / "mc_maps" / f"pass_{k:03d}.npz", **_maps(k))
    with open(tmp_path / "difficulty_history.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["pass", "epoch", "image", "D", "D_norm", "eps"])
        for k, epoch in enumerate(EPOCHS, start=1):
            ds = [d * k / len(EPOCHS) for d in LAST_D]  # the last pass holds LAST_D
            mu, sd = np.percentile(ds, 25), np.std(ds)
            for image, d in zip(IDS, ds):
                d_norm = (d - mu) / (sd + 1e-9)
                writer.writerow([k, epoch, image, d, d_norm, 0.5 / (1 + math.exp(-2 * d_norm))])
    return tmp_path


def _check_png(path, min_w=300, min_h=200):
    assert path.is_file()
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_w and im.height >= min_h, im.size
        return im.size


def test_write_figures_chooses_by_difficulty(run_dir):
    written = write_figures(run_dir)
    figures = run_dir / "figures"
    # hardest (highest last-pass D) among the saved subset first, then the easiest; img_9 has no maps
    assert written == [figures / "epsilon_distribution.png", figures / "uncertainty_img_2.png",
                       figures / "uncertainty_img_1.png"]
    _check_png(written[0])
    w, h = _check_png(written[1], min_w=800, min_h=450)  # five columns, three pass rows


def test_write_figures_chooses_by_scores(run_dir):
    dice = {image: 0.5 for image in IDS}
    dice.update({MAP_IDS[3]: 0.1, MAP_IDS[0]: 0.95, MAP_IDS[1]: 0.9, IDS[8]: 0.0, IDS[9]: float("nan")})
    written = write_figures(run_dir, scores=dice, n=2)
    names = [p.name for p in written[1:]]
    # hardest first (img_3, then one of the 0.5 ties broken by id), then easiest first (img_0, img_1)
    assert names == ["uncertainty_img_3.png", "uncertainty_img_2.png", "uncertainty_img_0.png",
                     "uncertainty_img_1.png"]
    for path in written:
        _check_png(path)


def test_choose_images():
    scores = {"a": 0.2, "b": 0.9, "c": float("nan"), "d": 0.5}
    assert choose_images(scores, ["a", "b", "c", "d", "e"]) == ["a", "b"]
    assert choose_images(scores, ["a", "b", "d"], n=2) == ["a", "d", "b"]  # no repeats when 2n > scored
    assert choose_images(scores, ["d"]) == ["d"]
    with pytest.raises(ValueError, match="finite score"):
        choose_images(scores, ["c", "e"])
    with pytest.raises(ValueError, match="at least 1"):
        choose_images(scores, ["a"], n=0)


def test_missing_id_raises(run_dir, tmp_path):
    files = sorted((run_dir / "mc_maps").glob("*.npz"))
    with pytest.raises(ValueError, match="img_7.jpg"):
        plot_uncertainty_evolution(files, IDS[7], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no MC map files"):
        plot_uncertainty_evolution([], IDS[0], tmp_path / "x.png")


def test_single_pass(tmp_path):
    (tmp_path / "mc_maps").mkdir()
    np.savez(tmp_path / "mc_maps" / "pass_001.npz", **_maps(1))
    with open(tmp_path / "difficulty_history.csv", "w", newline="") as f:
        f.write("pass,epoch,image,D,D_norm,eps\n")
        f.writelines(f"1,1,{image},{d},0.0,0.25\n" for image, d in zip(IDS, LAST_D))
    out = plot_uncertainty_evolution([tmp_path / "mc_maps" / "pass_001.npz"], MAP_IDS[0], tmp_path / "one.png")
    _check_png(out, min_h=100)
    written = write_figures(tmp_path)
    assert [p.name for p in written] == ["epsilon_distribution.png", "uncertainty_img_2.png",
                                         "uncertainty_img_1.png"]


def test_display_orientation():
    frame = _display(_maps(1)["image"][0])
    assert frame.shape == (HEIGHT, WIDTH, 3)  # wider than high, as the frame is
    assert (frame[:4, :, 0] == 1).all() and (frame[4:, 4:, 0] < 1).all()  # red stripe on top
    assert (frame[:, :4, 1] == 1).all() and (frame[4:, 4:, 1] < 1).all()  # green stripe on the left
