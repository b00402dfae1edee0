"""Annotated colonoscopy clips: SUN-SEG's and CVC-ClinicDB's layouts and --clip-table in prepare_data, the clip
metrics (S-α, E-φ, temporal stability) against hand numbers, and evaluation's per-clip report."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (CVC, EVAL_METRICS, EVALUATE, TINY, TINY_OVERRIDES, TRAIN, needs, parse, read_evaluation,
                      read_json, run_bundle, trained_network)
from PIL import Image

from scripts.data import load_datalist, write_datalist
from scripts.errors import InputError
from scripts.metrics import enhanced_alignment, mask_iou, structure_measure, temporal_stability
from scripts.prepare_data import cvc_clinicdb_sequence, main as prepare_data

EPS = np.spacing(1)


# ---- the metrics, by hand ----------------------------------------------------------------------------------------

def _object(x):
    """O(x) = 2 x̄ / (x̄² + 1 + σ(ddof 1) + eps)."""
    return 2 * x.mean() / (x.mean() ** 2 + 1 + x.std(ddof=1) + EPS)


def _ssim(p, g):
    """4 x̄ ȳ σ_xy / ((x̄² + ȳ²)(σ_x² + σ_y²) + eps), variances over N - 1 + eps; 1 if 0/0."""
    n, x, y = p.size, p.mean(), g.mean()
    sx, sy = ((p - x) ** 2).sum() / (n - 1 + EPS), ((g - y) ** 2).sum() / (n - 1 + EPS)
    sxy = ((p - x) * (g - y)).sum() / (n - 1 + EPS)
    num, den = 4 * x * y * sxy, (x**2 + y**2) * (sx + sy)
    return num / (den + EPS) if num != 0 else float(den == 0)


def test_structure_measure_of_a_4x4_map_by_hand():
    gt = np.zeros((4, 4))
    gt[1:3, 1:4] = 1  # rows 1-2, columns 1-3: centroid (1.5, 2.0)
    pred = np.array([[0.1, 0.0, 0.2, 0.1],
                     [0.0, 0.9, 0.8, 0.4],
                     [0.3, 0.7, 1.0, 0.6],
                     [0.0, 0.1, 0.0, 0.2]])
    y = 6 / 16
    s_object = y * _object(pred[gt == 1]) + (1 - y) * _object(1 - pred[gt == 0])
    # centroid row 1.5 rounds (half to even) to 2, column 2.0 to 2; plus one: the split is after row 3, column 3
    quadrants = [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(3, 4)), (slice(3, 4), slice(0, 3)),
                 (slice(3, 4), slice(3, 4))]
    weights = [9 / 16, 3 / 16, 3 / 16, 1 / 16]
    s_region = sum(w * _ssim(pred[q], gt[q]) for q, w in zip(quadrants, weights))
    expected = 0.5 * s_object + 0.5 * s_region
    assert structure_measure(pred, gt) == pytest.approx(expected, abs=1e-12)
    assert structure_measure(torch.as_tensor(pred), torch.as_tensor(gt)) == pytest.approx(expected, abs=1e-12)
    assert structure_measure(pred, gt, alpha=1.0) == pytest.approx(s_object, abs=1e-12)
    assert structure_measure(pred, gt, alpha=0.0) == pytest.approx(s_region, abs=1e-12)


def test_structure_measure_special_cases():
    pred = np.array([[0.2, 0.4], [0.6, 0.0]])
    assert structure_measure(pred, np.zeros((2, 2))) == pytest.approx(1 - 0.3)  # empty gt: 1 - mean(pred)
    assert structure_measure(pred, np.ones((2, 2))) == pytest.approx(0.3)  # full gt: mean(pred)
    gt = np.zeros((6, 5), bool)
    gt[1:4, 2:4] = True
    assert structure_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-12)  # a perfect map
    assert structure_measure(1 - gt.astype(float), gt) == pytest.approx(0.0, abs=1e-12)  # its inverse, clamped at 0
    # gt in the last row only: the bottom quadrants are empty (weight 0), where PySODMetrics returns NaN
    gt = np.zeros((4, 4), bool)
    gt[3, 1:3] = True
    assert np.isfinite(structure_measure(np.full((4, 4), 0.5), gt))
    for bad, match in ((np.full((4, 4), 1.5), "in \\[0, 1\\]"), (np.full((4, 3), 0.5), "same shape")):
        with pytest.raises(ValueError, match=match):
            structure_measure(bad, gt)
    with pytest.raises(ValueError, match="binary"):
        structure_measure(np.full((4, 4), 0.5), gt * 2)


def _enhanced(binary, gt):
    """E of one binary map, pixel by pixel: ξ = 2 ab / (a² + b² + eps) of the demeaned maps, φ = (1 + ξ)² / 4."""
    if gt.all() or not gt.any():  # the reference: the pixels B takes in (gt all one) or leaves out (all zero)
        return (binary.sum() if gt.all() else (~binary).sum()) / (gt.size - 1 + EPS)
    a, b = binary - binary.mean(), gt - gt.mean()
    xi = 2 * a * b / (a**2 + b**2 + EPS)
    return ((1 + xi) ** 2 / 4).sum() / (gt.size - 1 + EPS)


def test_enhanced_alignment_of_a_4x4_map_by_hand():
    gt = np.zeros((4, 4), bool)
    gt[0:2, 1:3] = True
    pred = np.array([[0.05, 0.9, 0.75, 0.3],
                     [0.1, 0.6, 0.95, 0.0],
                     [0.2, 0.4, 0.15, 0.0],
                     [0.0, 0.5, 0.0, 1.0]])
    levels = np.floor(pred * 255)  # the reference's uint8(255 pred)
    expected = np.mean([_enhanced((levels >= t).astype(float), gt.astype(float)) for t in range(255, -1, -1)])
    assert enhanced_alignment(pred, gt) == pytest.approx(expected, abs=1e-12)
    adaptive = _enhanced((pred >= 2 * pred.mean()).astype(float), gt.astype(float))
    assert enhanced_alignment(pred, gt, adaptive=True) == pytest.approx(adaptive, abs=1e-12)


def test_enhanced_alignment_special_cases():
    n = 16
    # empty gt, empty map: every threshold but 0 takes nothing (n pixels left out), threshold 0 takes all
    assert enhanced_alignment(np.zeros((4, 4)), np.zeros((4, 4))) == pytest.approx(255 / 256 * n / (n - 1))
    # full gt, full map: every threshold takes all n pixels
    assert enhanced_alignment(np.ones((4, 4)), np.ones((4, 4))) == pytest.approx(n / (n - 1))
    pred = np.full((4, 4), 0.25)  # the adaptive threshold 2 × 0.25 takes no pixel
    assert enhanced_alignment(pred, np.ones((4, 4)), adaptive=True) == 0.0
    assert enhanced_alignment(pred, np.zeros((4, 4)), adaptive=True) == pytest.approx(n / (n - 1))
    gt = np.eye(4, dtype=bool)
    assert enhanced_alignment(gt.astype(float), gt) == pytest.approx(
        (255 * _enhanced(gt.astype(float), gt.astype(float)) + _enhanced(np.ones((4, 4)), gt.astype(float))) / 256)


def test_metrics_match_values_pysodmetrics_gave():
    """S-α and E-φ of seeded random maps as PySODMetrics 1.6.2 computed them (Smeasure/Emeasure, normalize=False)."""
    rng = np.random.default_rng(2024)
    reference = [(0.5848695606888746, 0.6142888265770484, 0.8456845955980645),
                 (0.50951256317635, 0.5642077862917678, 0.5947856063022635),
                 (0.6130237016243939, 0.601745687097542, 0.8589747401540364)]
    for sm, em, adaptive in reference:
        gt = np.zeros((24, 31), bool)
        cy, cx, r = rng.uniform(5, 19), rng.uniform(5, 26), rng.uniform(3, 8)
        yy, xx = np.mgrid[:24, :31]
        gt[np.hypot(yy - cy, xx - cx) < r] = True
        pred = np.clip(0.6 * gt + rng.normal(0.2, 0.25, gt.shape), 0, 1)
        assert structure_measure(pred, gt) == pytest.approx(sm, abs=1e-12)
        assert enhanced_alignment(pred, gt) == pytest.approx(em, abs=1e-12)
        assert enhanced_alignment(pred, gt, adaptive=True) == pytest.approx(adaptive, abs=1e-12)


def test_temporal_stability_by_hand():
    empty = np.zeros((4, 4), bool)
    a = empty.copy()
    a[0:2, 0:2] = True  # 4 pixels
    b = empty.copy()
    b[1:3, 0:2] = True  # 4 pixels, 2 shared with a: IoU 2 / 6
    ious, flips = temporal_stability([empty, empty, a, b, empty, b])
    np.testing.assert_allclose(ious, [1.0, 0.0, 2 / 6, 0.0, 0.0])  # two empty masks: 1
    assert flips == 3  # frames 2 (appears), 4 (vanishes), 5 (appears)
    assert mask_iou(a, a) == 1.0 and mask_iou(torch.as_tensor(a), torch.as_tensor(b)) == pytest.approx(1 / 3)
    assert temporal_stability([a])[0].shape == (0,) and temporal_stability([a])[1] == 0
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(a, a[:3])


# ---- data preparation -------------------------------------------------------------------------------------------

def make_sunseg(root: Path, clips: dict[str, list[int]], size=(48, 64), odd: tuple[str, int] | None = None) -> Path:
    """
    A SUN-SEG-like root: Frame/<clip>/<clip>_<n>.jpg and GT/<clip>/<clip>_<n>.png for the frame numbers of each clip,
    a disc moving right over reddish mucosa (``odd``: that clip's frame is 8 px less high).
    """
    rng = np.random.default_rng(0)
    for c, (clip, numbers) in enumerate(clips.items()):
        for k, n in enumerate(numbers):
            h, w = (size[0] - 8, size[1]) if odd == (clip, n) else size
            yy, xx = np.mgrid[:h, :w]
            disc = np.hypot(yy - h / 2, xx - (10 + 6 * k + 3 * c)) < h / 4
            frame = np.stack([0.75 - 0.2 * disc, 0.4 + 0.1 * disc, 0.35 + 0.1 * disc], -1)
            frame = np.clip(frame + rng.normal(0, 0.03, frame.shape), 0, 1)
            for folder, array, suffix in (("Frame", (frame * 255).astype(np.uint8), "jpg"),
                                          ("GT", disc.astype(np.uint8) * 255, "png")):
                (root / folder / clip).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / folder / clip / f"{clip}_{n}.{suffix}")
    return root


def _entries(datalist: Path) -> dict[str, list[tuple[str, str]]]:
    """(clip, image file name) of every entry, by list."""
    content = read_json(datalist)
    return {k: [(e["clip"], Path(e["image"]).name) for e in content[k]] for k in ("training", "validation", "test")}


def test_sunseg_frames_get_their_clip_in_natural_order(tmp_path, caplog):
    root = make_sunseg(tmp_path / "TestEasyDataset" / "Seen", {"case10": [1, 2, 10], "case2": [10, 9, 1]},
                       size=(16, 16))
    assert prepare_data(["--root", str(root), "--output", str(tmp_path / "out"), "--test-fraction", "1"]) == 0
    content = read_json(tmp_path / "out" / "datalist.json")
    assert _entries(tmp_path / "out" / "datalist.json")["test"] == [
        ("case2", "case2_1.jpg"), ("case2", "case2_9.jpg"), ("case2", "case2_10.jpg"),
        ("case10", "case10_1.jpg"), ("case10", "case10_2.jpg"), ("case10", "case10_10.jpg")]
    assert all(Path(e["label"]).parts[-2:] == ("case2" if "case2_" in e["image"] else "case10",
                                               Path(e["image"]).stem + ".png") for e in content["test"])
    assert content["summary"]["layout"] == "SUN-SEG" and content["summary"]["clips"] == 2
    items = load_datalist(tmp_path / "out" / "datalist.json", "test")
    assert [i["clip"] for i in items] == ["case2"] * 3 + ["case10"] * 3
    # the release nests Frame/ + GT/: a root above them gets an error naming the folder to pass
    assert prepare_data(["--root", str(tmp_path), "--output", str(tmp_path / "o2")]) == 2
    assert caplog.records[-1].getMessage().endswith(f"SUN-SEG's Frame/ + GT/ are in {root}: pass one of them as "
                                                    "--root.")


def test_a_clip_stays_on_one_side_of_the_split(tmp_path):
    clips = {f"clip{i}": [1, 2, 3] for i in range(6)}
    root = make_sunseg(tmp_path / "sun", clips, size=(16, 16))
    assert prepare_data(["--root", str(root), "--output", str(tmp_path / "out"), "--test-fraction", "0.5",
                         "--val-fraction", "0.34"]) == 0
    entries = _entries(tmp_path / "out" / "datalist.json")
    sides = {side: {clip for clip, _ in entries[side]} for side in entries}
    assert [len(sides[s]) for s in ("training", "validation", "test")] == [2, 1, 3]
    assert set.union(*sides.values()) == set(clips) and sum(map(len, sides.values())) == 6  # each clip once


def test_clip_table_on_flat_folders(tmp_path):
    root = make_sunseg(tmp_path / "sun", {"a": [1, 2, 10], "b": [3, 11]}, size=(16, 16))
    for kind in ("Frame", "GT"):  # flattened: one folder of frames, one of masks
        (tmp_path / kind).mkdir()
        for path in (root / kind).glob("*/*"):
            path.rename(tmp_path / kind / path.name.split("_")[1])
    table = tmp_path / "clips.csv"
    table.write_text("frame,clip,note\n10,x,\n1,x,\n2,x,\n3,y,\n11.jpg,y,with its suffix\n")
    assert prepare_data(["--images", str(tmp_path / "Frame"), "--masks", str(tmp_path / "GT"), "--clip-table",
                         str(table), "--output", str(tmp_path / "out"), "--test-fraction", "1"]) == 0
    assert _entries(tmp_path / "out" / "datalist.json")["test"] == [
        ("x", "1.jpg"), ("x", "2.jpg"), ("x", "10.jpg"), ("y", "3.jpg"), ("y", "11.jpg")]


def test_clip_stays_a_name_through_write_and_load_datalist(tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "masks").mkdir()  # a folder named as the clip, beside the datalist
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "masks" / "a.png")
    pair = {"image": tmp_path / "images" / "a.png", "label": tmp_path / "masks" / "a.png", "clip": "masks"}
    path = write_datalist({"training": [pair]}, tmp_path, {})
    assert json.loads(path.read_text())["training"] == [{"image": "images/a.png", "label": "masks/a.png",
                                                          "clip": "masks"}]
    assert load_datalist(path, "training")[0]["clip"] == "masks"  # not joined into a path
    path.write_text(json.dumps({"training": [{"image": "images/a.png", "label": "masks/a.png", "clip": 3}]}))
    with pytest.raises(InputError, match="has 'clip' 3; it must be a non-empty string"):
        load_datalist(path, "training")


def _clip_table_case(tmp_path, content):
    root = make_sunseg(tmp_path / "sun", {"a": [1, 2]}, size=(16, 16))
    (tmp_path / "clips.csv").write_text(content)
    return ["--images", str(root / "Frame" / "a"), "--masks", str(root / "GT" / "a"), "--clip-table",
            str(tmp_path / "clips.csv")]


ERRORS = {
    "clip without masks": (lambda t: ["--root", str(make_sunseg(t / "sun", {"a": [1], "b": [1]}, size=(16, 16)))],
                           lambda t: shutil.rmtree(t / "sun" / "GT" / "b"),
                           "SUN-SEG clip b has frames in {t}/sun/Frame/b but no mask folder {t}/sun/GT/b; add"),
    "frame without mask": (lambda t: ["--root", str(make_sunseg(t / "sun", {"a": [1, 2]}, size=(16, 16)))],
                           lambda t: (t / "sun" / "GT" / "a" / "a_2.png").unlink(),
                           "1 image(s) in {t}/sun/Frame/a have no mask of the same stem in {t}/sun/GT/a: a_2.jpg"),
    "mixed sizes": (lambda t: ["--root", str(make_sunseg(t / "sun", {"a": [1, 2, 3]}, size=(16, 16), odd=("a", 2)))],
                    None, "the frames of clip a differ in size: {t}/sun/Frame/a/a_2.jpg is 8×16 (H×W) but 2 of its 3 "
                          "frames are 16×16"),
    "table names other frames": (lambda t: _clip_table_case(t, "frame,clip\na_1,x\na_2,x\na_7,x\n"), None,
                                 "clip table {t}/clips.csv names 1 frame(s) that are not among the images: a_7;"),
    "table lacks a column": (lambda t: _clip_table_case(t, "image,clip\na_1,x\n"), None,
                             "clip table {t}/clips.csv has no column frame (its header: image, clip); it needs"),
    "table lacks a frame": (lambda t: _clip_table_case(t, "frame,clip\na_1,x\n"), None,
                            "1 image(s) have no row in clip table {t}/clips.csv: a_2; add a row"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_clip_errors_are_one_line_naming_the_file(case, tmp_path, caplog):
    make, damage, message = ERRORS[case]
    args = make(tmp_path)
    if damage is not None:
        damage(tmp_path)
    assert prepare_data([*args, "--output", str(tmp_path / "out")]) == 2
    last = caplog.records[-1].getMessage()
    assert last.startswith("error: " + message.format(t=tmp_path)) and "\n" not in last, last
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_cvc_clinicdb_frame_to_sequence_table():
    firsts = {1: "1", 25: "1", 26: "2", 50: "2", 51: "3", 200: "10", 205: "10", 206: "11", 591: "28", 592: "29",
              612: "29"}
    assert {n: cvc_clinicdb_sequence(Path(f"{n}.tif")) for n in firsts} == firsts


@needs(CVC)
def test_cvc_clinicdb_as_released_is_clip_1_in_natural_order(tmp_path):
    root = tmp_path / "CVC-ClinicDB"
    for sub, folder in (("images", "Original"), ("masks", "Ground Truth")):
        (root / folder).mkdir(parents=True)
        for path in (CVC / sub).iterdir():
            (root / folder / path.name).symlink_to(path)
    assert prepare_data(["--root", str(root), "--output", str(tmp_path / "out"), "--test-fraction", "1"]) == 0
    content = read_json(tmp_path / "out" / "datalist.json")
    assert content["summary"]["layout"] == "CVC-ClinicDB" and content["summary"]["clips"] == 1
    assert _entries(tmp_path / "out" / "datalist.json")["test"] == [("1", f"{n}.tif") for n in range(1, 9)]
    # two more frame numbers (copies of real frames; the datalist resolves links): 10 goes after 8 in sequence 1,
    # 26 begins sequence 2
    for n, source in ((10, 7), (26, 8)):
        for sub, folder in (("images", "Original"), ("masks", "Ground Truth")):
            shutil.copy(CVC / sub / f"{source}.tif", root / folder / f"{n}.tif")
    assert prepare_data(["--root", str(root), "--output", str(tmp_path / "out"), "--test-fraction", "1"]) == 0
    assert _entries(tmp_path / "out" / "datalist.json")["test"] == [
        *(("1", f"{n}.tif") for n in (*range(1, 9), 10)), ("2", "26.tif")]


# ---- evaluation -------------------------------------------------------------------------------------------------

def _one_hot(foreground: np.ndarray) -> torch.Tensor:
    """(H, W) foreground values -> (2, W, H), the evaluator's channel-first maps in the readers' axis order."""
    fg = torch.as_tensor(foreground, dtype=torch.float32).T
    return torch.stack([1 - fg, fg])


def test_clip_metrics_saver_by_hand(tmp_path):
    """Frames scored in datalist order: clip a (6 frames), a frame without clip, clip b (2 frames: none scored)."""
    from ignite.engine import Engine, Events

    from scripts.reports import ClipMetricsSaver

    rng = np.random.default_rng(1)
    label = np.zeros((6, 8), bool)
    label[2:5, 3:6] = True
    shown = [1, 0, 1, 1, 0, 0]  # clip a's frames with a predicted polyp; scored: frames 1-4, [0, 1, 1, 0]
    probs = [np.clip(0.8 * label * s + rng.uniform(0, 0.3, label.shape), 0, 1) for s in shown]
    probs[3][2, 3] = 0.2  # frame 3's mask differs from frame 2's
    frames = [{"clip": "a", "prob": p} for p in probs] + [{"prob": probs[0]}] + [{"clip": "b", "prob": probs[1]}] * 2
    dice = torch.tensor([[0.1], [0.2], [float("nan")], [0.4], [0.5], [0.6], [0.7], [0.8], [0.9]])

    def step(engine, frame):
        engine.state.batch = [{k: v for k, v in frame.items() if k == "clip"}]
        prob = _one_hot(frame["prob"])
        return [{"prob": prob, "label": _one_hot(label), "pred": (prob > 0.5).float()}]

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(e.state, "metric_details", {"val_dice": dice}))
    ClipMetricsSaver(tmp_path, {"dice": "val_dice"}, split="validation").attach(engine)
    engine.run(frames, max_epochs=1)
    with open(tmp_path / "validation_clip_metrics.csv", newline="") as f:
        rows = {r["clip"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["a", "b", "mean"]
    masks = [p > 0.5 for p in probs[1:5]]
    ious, flips = temporal_stability(masks)
    assert flips == 2 and 0 < ious[1] < 1
    expected = {"frames": 4, "dice": np.mean([0.2, 0.4, 0.5]),
                "s_alpha": np.mean([structure_measure(p, label) for p in probs[1:5]]),
                "e_phi": np.mean([enhanced_alignment(p, label) for p in probs[1:5]]),
                "consecutive_iou": ious.mean(), "presence_flips": 2}
    for column, value in expected.items():
        assert float(rows["a"][column]) == pytest.approx(value, abs=1e-6), column
        assert float(rows["mean"][column]) == pytest.approx(value, abs=1e-6), column  # b has no frame scored
    assert rows["b"]["frames"] == "0" and rows["b"]["dice"] == "nan"



def test_evaluation_writes_clip_metrics_matching_an_independent_computation(trained, tmp_path):
    root = make_sunseg(tmp_path / "sun", {"clipB": list(range(1, 6)), "clipA": list(range(1, 6))})
    data, out = tmp_path / "data", tmp_path / "eval"
    assert prepare_data(["--root", str(root), "--output", str(data), "--test-fraction", "1"]) == 0
    run_bundle("run", "evaluating", "--config_file", EVALUATE, "--dataset_dir", str(data), "--ckpt_dir",
               str(trained / "models"), "--output_dir", str(out), *TINY)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.csv", "test_clip_metrics.csv", *(f"test_{m}_{k}.csv" for m in EVAL_METRICS
                                                   for k in ("raw", "summary"))])
    with open(out / "test_clip_metrics.csv", newline="") as f:
        rows = {r["clip"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["clipA", "clipB", "mean"]  # natural order of clips, then the mean

    # independent: per-image metrics from MetricsSaver's raw files, maps from the network run by hand
    per_image = read_evaluation(out)["images"]
    parser = parse([TRAIN, "configs/evaluate.yaml"], dataset_dir=str(data), device="cpu", **TINY_OVERRIDES)
    net = trained_network(trained, TRAIN)
    frames = {}
    for item in parser.get_parsed_content("validate#dataset"):  # the test list, in datalist order
        with torch.no_grad():
            prob = torch.softmax(net(item["image"][None]), 1)[0, 1].numpy().T  # (W, H) -> (H, W)
        label = item["label"][0].numpy().T > 0.5
        frames.setdefault(item["clip"], []).append((str(item["image"].meta["filename_or_obj"]), prob, label))
    expected = {}
    for clip, scored in frames.items():
        scored = scored[1:-1]  # SUN-SEG drops each clip's first and last frame
        ious, flips = temporal_stability([prob > 0.5 for _, prob, _ in scored])  # argmax of two classes
        expected[clip] = {"frames": len(scored),
                          **{m: np.nanmean([per_image[name][m] for name, _, _ in scored]) for m in EVAL_METRICS},
                          "s_alpha": np.mean([structure_measure(p, g) for _, p, g in scored]),
                          "e_phi": np.mean([enhanced_alignment(p, g) for _, p, g in scored]),
                          "consecutive_iou": ious.mean(), "presence_flips": flips}
    expected["mean"] = {k: np.mean([expected[c][k] for c in frames]) for k in expected["clipA"]}
    for clip, values in expected.items():
        for column, value in values.items():
            assert float(rows[clip][column]) == pytest.approx(value, abs=1e-5), (clip, column)
    assert rows["clipA"]["frames"] == "3" and rows["mean"]["frames"] == "3.000000"

    # a second evaluation sets the first one's clip report aside with its other reports
    run_bundle("run", "evaluating", "--config_file", EVALUATE, "--dataset_dir", str(data), "--ckpt_dir",
               str(trained / "models"), "--output_dir", str(out), *TINY)
    (previous,) = (out / "previous").iterdir()
    assert (previous / "test_clip_metrics.csv").read_text() == (out / "test_clip_metrics.csv").read_text()
