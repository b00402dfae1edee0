"""
The label audit finds corrupted labels: a real Kvasir-SEG slice with a few masks broken on purpose (erased,
shifted, swapped between two images), a small model trained on it with the bundle's own command, and the
``label_audit.csv`` that training writes ranks the broken labels near the top far more often than chance.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from conftest import KVASIR, TRAIN, load_benchmark, needs, read_json, run
from PIL import Image

from scripts.prepare_data import main as prepare_data

pytestmark = needs(KVASIR)

def _mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def corrupted_kvasir(root: Path, num_images: int, counts: dict[str, int], seed: int = 0, min_area: float = 0.0,
                     max_overlap: float = 0.3) -> dict[str, list[str]]:
    """
    ``num_images`` Kvasir-SEG pairs (a seeded draw) in ``root/frames/{images,masks}``, symlinks to the shared data
    except ``counts[kind]`` masks of each kind broken by the study's ``corrupt_labels`` (benchmarks/difficulty.py:
    erased, shifted by a third of the frame, swapped between two images; each broken mask overlapping the true one
    by Dice <= ``max_overlap``), written as new 0/255 PNGs of the frame's size. Frames whose polyp covers less than
    ``min_area`` of the frame are not drawn. Returns the stems of the corrupted images by kind; the shared data is
    never written.
    """
    rng = np.random.default_rng(seed)
    stems = sorted(p.stem for p in (KVASIR / "images").iterdir())
    chosen = []
    for i in rng.permutation(len(stems)):
        if len(chosen) == num_images:
            break
        if min_area <= 0 or _mask(KVASIR / "masks" / f"{stems[i]}.jpg").mean() >= min_area:
            chosen.append(stems[i])
    chosen.sort()
    # the same generator draws the broken labels: one seed fixes the whole slice
    new, broken = load_benchmark("difficulty.py").corrupt_labels(
        [KVASIR / "masks" / f"{stem}.jpg" for stem in chosen], counts, rng, max_overlap)
    images, masks = root / "frames" / "images", root / "frames" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for stem in chosen:
        (images / f"{stem}.jpg").symlink_to(KVASIR / "images" / f"{stem}.jpg")
        label = KVASIR / "masks" / f"{stem}.jpg"
        if label in new:
            Image.fromarray(new[label].astype(np.uint8) * 255).save(masks / f"{stem}.png")
        else:
            (masks / f"{stem}.jpg").symlink_to(label)
    return {kind: [p.stem for p in paths] for kind, paths in broken.items()}


def audit_ranks(csv_path: Path, corrupted: dict[str, list[str]]) -> tuple[list[dict], dict[str, list[int]]]:
    """The rows of ``label_audit.csv`` and the rank (1 = most suspect) of each corrupted image, by kind."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rank = {Path(r["image"]).stem: int(r["rank"]) for r in rows}
    return rows, {kind: sorted(rank[s] for s in stems) for kind, stems in corrupted.items()}


def test_training_ranks_corrupted_labels_near_the_top(tmp_path, monkeypatch):
    # 80 frames, 6 labels broken (7.5 %). At 64 px a polyp under 5 % of the frame is a few dozen pixels, which the
    # small model below misses on clean labels as often as on broken ones, so such frames are not drawn.
    corrupted = corrupted_kvasir(tmp_path, num_images=80, counts={"erased": 2, "shifted": 2, "swapped": 2}, seed=0,
                                 min_area=0.05)
    data, out = tmp_path / "data", tmp_path / "run"
    # every pair for training: the audit ranks the training images, and without validation no epoch is spent on it
    assert prepare_data(["--root", str(tmp_path / "frames"), "--output", str(data), "--test-fraction", "0",
                         "--val-fraction", "0"]) == 0
    # One intra-op thread: for a network this small torch's default of a thread per core was 3-5x slower on a
    # 2-core machine that other jobs share (about 1 s an epoch here with one thread).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The adaptive default with one difficulty pass, at the start of the last epoch, so that training itself writes
    # label_audit.csv and, at its end, figures/label_audit.png, ranked by the default 1 - Dice of the mean prediction.
    # With version 0.12's ranking, (1 - Dice)(1 - q_D), fewer epochs ranked the shifted and swapped labels lower
    # (docs/results_difficulty.md measures both rankings); 30 epochs put 5 or 6 of the 6 in the top 16 for 13 of 15
    # seeds of corrupted_kvasir with it. This seed, under the default ranking: the 6 broken labels at ranks 2 to 7,
    # the same in every run on one machine (the run is deterministic on the CPU).
    epochs = 30
    run("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--dataset_dir", str(data),
        "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), "--image_size", "64",
        "--features", "[8,16,32,64,64]", "--batch_size", "8", "--num_workers", "0", "--epochs", str(epochs),
        "--mc_start", str(epochs), "--mc_interval", "1", "--mc_samples", "4", "--learning_rate", "0.003")

    training = read_json(data / "datalist.json")["training"]
    rows, ranks = audit_ranks(out / "eval" / "label_audit.csv", corrupted)
    # complete: every training image once, ranked 1..M, most suspect first
    assert sorted(Path(r["image"]).stem for r in rows) == sorted(Path(d["image"]).stem for d in training)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(training) + 1))
    suspicion = [float(r["suspicion"]) for r in rows]
    assert suspicion == sorted(suspicion, reverse=True)
    broken = {s for stems in corrupted.values() for s in stems}
    assert all((Path(r["label"]).suffix == ".png") == (Path(r["image"]).stem in broken) for r in rows)
    assert (out / "eval" / "figures" / "label_audit.png").is_file()

    # Near the top far more often than chance: of M = 80 images, 6 broken, a random ranking puts on average
    # 6 * 16 / 80 = 1.2 of them in the top 16 (20 %), and 5 or more with probability
    # scipy.stats.hypergeom.sf(4, 80, 6, 16) = 9.6e-4 (6 of 6: 2.7e-5).
    m, n, k = len(rows), len(broken), len(rows) // 5
    hits = sum(r <= k for kind_ranks in ranks.values() for r in kind_ranks)
    assert hits >= 5, (f"{hits} of the {n} broken labels in the top {k} of {m} (chance expectation {n * k / m:.1f}); "
                       f"ranks {ranks}")
