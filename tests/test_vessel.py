"""
The vessel task as a user runs it (configs/vessel/*.yaml over the bundle's configs): prepare → train on patches with
a difficulty pass → evaluate whole images with the metrics of tubular.md §1 inside the field of view → infer with
uncertainty maps and a picture of where the mask breaks, on a real CHASE_DB1 slice (skipped without the data) and
on a generated set in DRIVE's layout; the adaptive ε of patches, the overlays, and the patch-size error.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import skimage.measure
import torch
from conftest import BUNDLE_ROOT, CHASE, bundle_error, needs, parse, read_json, run, run_bundle
from monai.data import list_data_collate
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata
from skimage.morphology import skeletonize
from test_vessel_data import _drive

from scripts.figures import TOPOLOGY_COLOURS
from scripts.losses import PolyDiceLoss
from scripts.prepare_data import main as prepare

TRAIN = ["configs/train.yaml", "configs/vessel/train.yaml"]
ADAPTIVE = TRAIN + ["configs/loss/adaptive_polydice1.yaml"]   # the vessel default is the Dice loss
EVALUATE = ["configs/train.yaml", "configs/evaluate.yaml", "configs/vessel/train.yaml", "configs/vessel/evaluate.yaml"]
INFER = ["configs/inference.yaml", "configs/vessel/inference.yaml"]
TINY_NET = ["--features", "[4,8,8,16,16]", "--num_workers", "0"]
# a 2-image CHASE_DB1 training slice, children 1 and 2; --val-fraction 0.34 of the three children 1, 2, 5 draws 5
STEMS = ("Image_01L", "Image_02L", "Image_05L", "Image_11L")
VESSEL_METRICS = ("dice", "iou", "precision", "recall", "cldice", "vca", "betti0_error", "betti1_error",
                  "sensitivity", "specificity", "accuracy", "auc")


@contextmanager
def one_thread() -> Iterator[None]:
    """
    One thread for torch here and in the commands started meanwhile: on a CPU that other jobs share, two OpenMP
    threads of small convolutions wait for each other (measured here: 0.08 s against 5 s for an MC pass over 42
    windows), and one thread leaves the other core to them.
    """
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def config_files(files: list[str]) -> str:
    return "[" + ",".join(f"'{f}'" for f in files) + "]"


def read_metrics(folder: Path) -> dict[str, float]:
    with open(folder / "metrics.csv", newline="") as f:
        return {name.removeprefix("test_"): float(value) for name, value in csv.reader(f)}


def read_raw(folder: Path, metric: str, split: str = "test") -> dict[str, float]:
    with open(folder / f"{split}_{metric}_raw.csv", newline="") as f:
        return {Path(row["filename"]).name: float(row["class0"]) for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def chase_data(tmp_path_factory) -> Path:
    """The slice symlinked into CHASE_DB1's one-folder layout and prepared with the bundle's command: its folder."""
    if not CHASE.is_dir():
        pytest.skip(f"real data not found at {CHASE} (set POLYP_SHARED_DATA)")
    root = tmp_path_factory.mktemp("chase")
    (root / "CHASE_DB1").mkdir()
    for stem in STEMS:
        for suffix in (".jpg", "_1stHO.png", "_2ndHO.png"):
            (root / "CHASE_DB1" / f"{stem}{suffix}").symlink_to(CHASE / f"{stem}{suffix}")
    assert prepare(["--root", str(root / "CHASE_DB1"), "--output", str(root / "data"), "--val-fraction", "0.34"]) == 0
    names = {k: [Path(e["image"]).stem for e in v] for k, v in read_json(root / "data" / "datalist.json").items()
             if k != "summary"}
    assert names == {"training": ["Image_01L", "Image_02L"], "validation": ["Image_05L"], "test": ["Image_11L"]}
    return root / "data"


@pytest.fixture(scope="module")
def chase_run(chase_data, tmp_path_factory) -> Path:
    """
    The tiny U-Net trained on the slice for 2 epochs (8 patches of 48 px per image, one difficulty pass at epoch 2,
    validation at epoch 2), its foreground bias then shifted so that at least a tenth of the test image's field of
    view is vessel (two epochs leave it calling nearly every pixel one class: metrics over a constant mask could not fail);
    evaluated on the test image and run by inference with 2 MC samples on a crop of it. Its folder: models/,
    eval/ (training), report/ (evaluation), balanced/ (the shifted model), infer/.
    """
    out = tmp_path_factory.mktemp("chase_run")
    with one_thread():
        _chase_run(chase_data, out)
    return out


def _chase_run(chase_data: Path, out: Path) -> None:
    run("-m", "monai.bundle", "run", "training", "--config_file", config_files(ADAPTIVE), "--dataset_dir",
        str(chase_data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), *TINY_NET,
        "--epochs", "2", "--patches_per_image", "8", "--val_interval", "2", "--mc_start", "2", "--mc_samples", "2",
        "--difficulty#pass#num_map_images", "0", "--difficulty#pass#num_audit_images", "0")  # maps: seconds each
    # the balanced model, from the logits the evaluation will compute
    parser = parse(EVALUATE, dataset_dir=str(chase_data), device="cpu", features=[4, 8, 8, 16, 16])
    net = parser.get_parsed_content("network_def")
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    net.load_state_dict(state)
    item = parser.get_parsed_content("validate#preprocessing")(parser.get_parsed_content("validate#dataset#data")[0])
    with torch.no_grad():
        logits = parser.get_parsed_content("validate#inferer")(item["image"][None], net.eval())[0]
    margin = (logits[1] - logits[0])[item["fov"][0] > 0].as_tensor()
    state["outc.bias"][1] -= float(torch.quantile(margin, 0.9))
    (out / "balanced").mkdir()
    torch.save(state, out / "balanced" / "model.pt")
    (out / "balanced" / "run.json").write_bytes((out / "models" / "run.json").read_bytes())
    run_bundle("run", "evaluating", "--config_file", config_files(EVALUATE), "--dataset_dir",
               str(chase_data), "--ckpt_dir", str(out / "balanced"), "--output_dir", str(out / "report"), *TINY_NET)
    # inference with 2 MC samples in 48-px windows (the defaults) on a 320 × 288 crop of the test photograph
    # and its ground truth, for the picture of where the mask breaks
    (out / "photos").mkdir()
    (out / "truths").mkdir()
    Image.open(CHASE / "Image_11L.jpg").crop((340, 330, 660, 618)).save(out / "photos" / "crop.png")
    Image.open(CHASE / "Image_11L_1stHO.png").crop((340, 330, 660, 618)).save(out / "truths" / "crop_1stHO.png")
    run_bundle("run", "--config_file", config_files(INFER), "--input_dir", str(out / "photos"),
               "--output_dir", str(out / "infer"), "--ckpt_dir", str(out / "balanced"), "--mc_samples", "2",
               *TINY_NET, "--label_dir", str(out / "truths"))


@needs(CHASE)
def test_the_vessel_default_is_the_dice_loss_and_adaptive_training_one_overlay_away():
    default = parse(TRAIN, device="cpu")
    assert type(default.get_parsed_content("loss")).__name__ == "DiceLoss" and default["adaptive"] is False
    adaptive = parse(ADAPTIVE, device="cpu")
    assert type(adaptive.get_parsed_content("loss")).__name__ == "AdaptivePolyDiceLoss" and adaptive["adaptive"] is True


def test_patches_carry_their_source_image_to_the_adaptive_eps(chase_data):
    parser = parse(ADAPTIVE, dataset_dir=str(chase_data), device="cpu", patches_per_image=6, num_workers=0)
    items = parser.get_parsed_content("train#datalist")
    preprocessing = parser.get_parsed_content("train#preprocessing")
    batch = list_data_collate([preprocessing(item) for item in items])  # what the DataLoader makes of 2 images
    assert batch["image"].shape == (12, 3, 48, 48) and batch["label"].shape == batch["fov"].shape == (12, 1, 48, 48)
    ids = batch["label"].meta["filename_or_obj"]
    labels = [item["label"] for item in items]
    assert list(ids) == [labels[0]] * 6 + [labels[1]] * 6  # the whole image's id, which the difficulty pass writes
    assert set(batch["image"].meta["filename_or_obj"]) == {item["image"] for item in items}
    assert all(fov.sum() > 0 for fov in batch["fov"])  # centred inside the field of view, so every patch reaches it
    assert 0 < float(batch["label"].mean()) < 0.6  # vessel-centred patches and background-centred ones
    # the loss reads each patch's eps from its source image's row of the table
    table, loss = parser.get_parsed_content("epsilon_table"), parser.get_parsed_content("loss")
    table.update(labels, [0.1, 0.4])
    logits = torch.randn(12, 2, 48, 48)
    expected = PolyDiceLoss(order=1)(logits, batch["label"].as_tensor(), eps=torch.tensor([0.1] * 6 + [0.4] * 6))
    torch.testing.assert_close(loss(logits, batch["label"]), expected)


@needs(CHASE)
def test_training_keeps_one_eps_per_source_image(chase_data, chase_run):
    training = [e["label"] for e in parse(TRAIN, dataset_dir=str(chase_data)).get_parsed_content("train#datalist")]
    final = torch.load(chase_run / "models" / "checkpoint_final.pt", weights_only=True)
    table = final["epsilon_table"]
    assert table["num_passes"] == 1
    assert sorted(name for name, _ in table["values"]) == sorted(training)  # whole images, not patches
    assert all(0.0 <= eps <= 0.5 for _, eps in table["values"])
    with open(chase_run / "eval" / "difficulty_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["label"] for r in rows) == sorted(training) and {r["epoch"] for r in rows} == {"2"}
    settings = read_json(chase_run / "models" / "run.json")["settings"]
    assert settings["patch_size"] == 48 and settings["patches_per_image"] == 8
    assert (chase_run / "models" / "model.pt").is_file()  # the validation's best (Dice inside the FOV)


def reference_metrics(chase_data: Path, model: Path) -> dict[str, float]:
    """
    The test image's metrics by hand: the model's argmax and softmax against the first observer, on the FOV's
    pixels. In the readers' (W, H) axis order, as the bundle computes them: skeletonize is not symmetric under
    transposition (on CHASE_DB1's observers the skeletons of an image and of its transpose differ in 2-3 % of their
    pixels, and clDice by about 4e-4).
    """
    parser = parse(EVALUATE, dataset_dir=str(chase_data), device="cpu", features=[4, 8, 8, 16, 16])
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(model, weights_only=True))
    entry = parser.get_parsed_content("validate#dataset#data")[0]
    image = np.asarray(Image.open(entry["image"]).convert("RGB"), np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(image.transpose(2, 1, 0).copy())[None]  # (1, 3, W, H)
    with torch.no_grad():
        softmax = torch.softmax(parser.get_parsed_content("validate#inferer")(x, net.eval()), 1)[0]
    probability, p = softmax[1].numpy(), torch.argmax(softmax, 0).numpy() == 1  # argmax: ties as the evaluation's
    g, fov = (np.asarray(Image.open(entry[k])).T > 0 for k in ("label", "fov"))
    tp, fp = (p & g & fov).sum(), (p & ~g & fov).sum()
    tn, fn = (~p & ~g & fov).sum(), (~p & g & fov).sum()
    p_in, g_in = p & fov, g & fov
    sp, sg = skeletonize(p_in), skeletonize(g_in)
    t_prec, t_sens = (sp & g_in).sum() / sp.sum(), (sg & p_in).sum() / sg.sum()
    components = [ndimage.label(m, structure=np.ones((3, 3)))[1] for m in (p_in, g_in)]
    ranks = rankdata(probability[fov])  # AUC: the Mann-Whitney U over |positives| · |negatives|, ties one half
    positives = g[fov]
    n1, n0 = positives.sum(), (~positives).sum()
    return {"dice": 2 * tp / (2 * tp + fp + fn), "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "accuracy": (tp + tn) / fov.sum(), "cldice": 2 * t_prec * t_sens / (t_prec + t_sens),
            "vca": components[0] / components[1], "auc": (ranks[positives].sum() - n1 * (n1 + 1) / 2) / (n1 * n0),
            "accuracy_whole_image": (p == g).mean()}


@needs(CHASE)
def test_evaluation_reports_every_metric_inside_the_field_of_view(chase_data, chase_run):
    report = chase_run / "report"
    metrics = read_metrics(report)
    assert list(metrics) == list(VESSEL_METRICS)
    for name in VESSEL_METRICS:  # per image (the one test image) and summarised, as MetricsSaver writes them
        assert list(read_raw(report, name)) == ["Image_11L.jpg"]
        assert (report / f"test_{name}_summary.csv").is_file()
    with one_thread():
        expected = reference_metrics(chase_data, chase_run / "balanced" / "model.pt")
    for name in ("dice", "sensitivity", "specificity", "accuracy", "cldice", "vca", "auc"):
        assert metrics[name] == pytest.approx(expected[name], rel=1e-4), name
    assert 0.05 < metrics["dice"] < 0.95  # neither mask constant
    # the third of the frame outside the FOV, nearly all true negatives, does not count
    assert abs(metrics["accuracy"] - expected["accuracy_whole_image"]) > 0.01
    assert metrics["recall"] == pytest.approx(metrics["sensitivity"])  # both over the FOV
    assert metrics["betti0_error"] >= 0 and metrics["betti1_error"] >= 0


@needs(CHASE)
def test_inference_writes_the_mask_and_the_uncertainty_maps(chase_run):
    out = chase_run / "infer"
    mask = np.asarray(Image.open(out / "crop_mask.png"))
    assert mask.shape == (288, 320) and set(np.unique(mask)) <= {0, 255} and 0 < mask.mean() < 255
    for name in ("probability", "variance", "entropy", "mutual_information"):
        assert Image.open(out / f"crop_{name}.png").size == (320, 288)
        assert nib.load(out / f"crop_{name}.nii.gz").shape == (320, 288)  # (W, H)
    probability = np.asarray(nib.load(out / "crop_probability.nii.gz").dataobj).T
    np.testing.assert_array_equal(mask > 0, probability >= 0.5)  # the mean of the samples, at 0.5
    with open(out / "uncertainty.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["height"], row["width"]) == ("288", "320") and int(row["area_pixels"]) == (mask > 0).sum()


@needs(CHASE)
def test_inference_and_evaluation_picture_where_the_mask_breaks(chase_run):
    out = chase_run / "infer"
    mask = np.asarray(Image.open(out / "crop_mask.png")) > 0
    truth = np.asarray(Image.open(chase_run / "truths" / "crop_1stHO.png").convert("L")) > 0
    picture = np.asarray(Image.open(out / "crop_topology.png"))
    assert picture.shape == (288, 320, 3)
    colours = {k: np.array(v) for k, v in TOPOLOGY_COLOURS.items()}
    painted = {k: (picture == c).all(-1) for k, c in colours.items()}
    # pixels no ring or defect covers keep the class they are in
    plain = ~(painted["break"] | painted["fragment"])
    assert painted["vessel"][plain].sum() == (mask & truth)[plain].sum() > 0
    assert painted["missed"][plain].sum() == (truth & ~mask)[plain].sum() > 0
    assert painted["false_positive"][plain].sum() == (mask & ~truth)[plain].sum()
    with open(out / "topology.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    pieces = skimage.measure.label(mask, connectivity=2)
    assert int(row["fragments"]) == int((np.bincount(pieces.ravel())[1:] < 100).sum())
    assert float(row["missed_fraction"]) == pytest.approx((truth & ~mask).sum() / truth.sum(), abs=1e-6)
    assert int(row["breaks"]) >= 0 and painted["break"].any() == (int(row["breaks"]) > 0)
    # evaluation draws the same picture of each test image, inside its field of view
    report = chase_run / "report" / "overlays"
    assert np.asarray(Image.open(report / "Image_11L_topology.png")).shape == (960, 999, 3)
    with open(report / "topology.csv", newline="") as f:
        assert [Path(r["image"]).name for r in csv.DictReader(f)] == ["Image_11L.jpg"]



@needs(CHASE)
def test_two_process_evaluation_writes_every_images_topology_row(chase_data, chase_run, tmp_path):
    """configs/multi_gpu_evaluate.yaml over the vessel evaluation, 2 gloo processes, one training image each."""
    files = config_files([*EVALUATE, "configs/multi_gpu_evaluate.yaml"])
    with one_thread():
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531", "-m",
             "monai.bundle", "run", "evaluating", "--config_file", files, "--backend", "gloo", "--device", "cpu",
             "--dataset_dir", str(chase_data), "--ckpt_dir", str(chase_run / "balanced"), "--output_dir",
             str(tmp_path), "--eval_split", "training", *TINY_NET],
            cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    images = ["Image_01L.jpg", "Image_02L.jpg"]
    # MONAI's metrics gather the two processes' images; the reports are named by the list scored
    assert sorted(read_raw(tmp_path, "dice", split="training")) == images
    assert not list(tmp_path.glob("test_*"))
    with open(tmp_path / "overlays" / "topology.csv", newline="") as f:
        assert sorted(Path(r["image"]).name for r in csv.DictReader(f)) == images
    assert sorted(p.name for p in (tmp_path / "overlays").glob("*.png")) == [
        "Image_01L_topology.png", "Image_02L_topology.png"]


REFINER = ["configs/vessel/refiner.yaml"]
# the second stage, tiny: 64-px crops (2 per image), the backbone in 96-px windows (a quarter of the 48-px windows'
# calls over a whole image), 2 solver steps
REFINE_TINY = [*TINY_NET, "--patch_size", "64", "--patches_per_image", "2", "--diffusion_steps", "2",
               "--backbone_window", "96", "--val_interval", "2"]


@pytest.fixture(scope="module")
def refined_run(chase_data, chase_run, tmp_path_factory) -> Path:
    """
    The refiner's second stage on chase_run's balanced model (copied to backbone/): two epochs, then resumed to
    three; evaluated on the test image with 3 solver steps. Its folder: backbone/, models/, train/, report/, and
    epoch1.pt, the first epoch's checkpoint.
    """
    out = tmp_path_factory.mktemp("refined")
    (out / "backbone").mkdir()
    for name in ("model.pt", "run.json"):
        (out / "backbone" / name).write_bytes((chase_run / "balanced" / name).read_bytes())
    common = ["--dataset_dir", str(chase_data), "--backbone_dir", str(out / "backbone"), "--ckpt_dir",
              str(out / "models"), "--output_dir", str(out / "train"), *REFINE_TINY]
    with one_thread():
        for epochs, resume in (("2", "False"), ("3", "True")):
            run("-m", "monai.bundle", "run", "training", "--config_file", config_files(TRAIN + REFINER + [
                "configs/vessel/train_refiner.yaml"]), *common, "--epochs", epochs, "--resume", resume)
            if resume == "False":  # kept aside: the resumed run's last two checkpoints replace it
                (out / "epoch1.pt").write_bytes((out / "models" / "checkpoint_epoch=1.pt").read_bytes())
        run_bundle("run", "evaluating", "--config_file", config_files(EVALUATE + REFINER), "--dataset_dir",
                   str(chase_data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "report"), *TINY_NET,
                   "--diffusion_steps", "3", "--backbone_window", "96")
    return out


@needs(CHASE)
def test_the_refiner_stage_trains_the_head_only_resumes_and_is_evaluated_by_overlay(chase_data, chase_run,
                                                                                     refined_run):
    models = refined_run / "models"
    record = read_json(models / "run.json")
    assert record["fingerprint"]["network"].startswith("DiffusionRefiner(backbone_class='DropoutUNet'")
    backbone_run = read_json(refined_run / "backbone" / "run.json")["run_id"]
    assert record["settings"]["backbone"] == f"run {backbone_run}" and record["settings"]["diffusion_order"] == 8
    second, final = (torch.load(models / n, weights_only=True) for n in ("checkpoint_epoch=2.pt",
                                                                          "checkpoint_final.pt"))
    assert final["trainer"]["iteration"] == 3 * second["trainer"]["iteration"] // 2 > 0  # resumed to epoch 3
    assert final["run_identity"]["run_id"] == record["run_id"]
    # the schedule resumed with the run, stepped at each epoch's end and stretched from the first command's 2 epochs
    # to 3: epoch 3 trained at lr 1e-4 · (1 + cos(2π/3)) / 2, not at the 0 where a 2-epoch cosine ends
    assert final["lr_scheduler"]["last_epoch"] == 3 and final["lr_scheduler"]["T_max"] == 3
    assert not torch.equal(final["model"]["head.weight"], second["model"]["head.weight"])
    backbone = torch.load(refined_run / "backbone" / "model.pt", weights_only=True)
    assert all(torch.equal(final["model"][f"backbone.{k}"], v) for k, v in backbone.items())  # loaded, then frozen
    first = torch.load(refined_run / "epoch1.pt", weights_only=True)
    assert not torch.equal(first["model"]["head.weight"], second["model"]["head.weight"])  # the head trains
    assert len(final["optimizer"]["param_groups"][0]["params"]) == 2  # the head's weight and bias only
    # the evaluation built the refiner (configs/vessel/refiner.yaml) and scored what the diffusion made of the mask
    refined, plain = read_metrics(refined_run / "report"), read_metrics(chase_run / "report")
    assert list(refined) == list(VESSEL_METRICS) and 0 < refined["dice"] < 1
    assert refined["dice"] != plain["dice"]
    # a refined model evaluated without the refiner's overlay, resume against another backbone, no backbone at all
    assert bundle_error(EVALUATE, dataset_dir=str(chase_data), ckpt_dir=str(models), features=[4, 8, 8, 16, 16],
                        num_workers=0).endswith(
        "but this command builds DropoutUNet: add configs/vessel/refiner.yaml last to --config_file.")
    stage = TRAIN + REFINER + ["configs/vessel/train_refiner.yaml"]
    settings = dict(dataset_dir=str(chase_data), ckpt_dir=str(models), output_dir=str(refined_run / "train"),
                    features=[4, 8, 8, 16, 16], num_workers=0, patch_size=64, patches_per_image=2, diffusion_steps=2,
                    backbone_window=96, val_interval=2, epochs=3)
    other = refined_run / "other_backbone"
    other.mkdir()
    (other / "model.pt").write_bytes((refined_run / "backbone" / "model.pt").read_bytes())
    (other / "run.json").write_text((refined_run / "backbone" / "run.json").read_text().replace(backbone_run,
                                                                                                "0th3rrun"))
    message = bundle_error(stage, backbone_dir=str(other), resume=True, **settings)
    assert f'belongs to another run (backbone: "run {backbone_run}" there, "run 0th3rrun" here)' in message
    assert bundle_error(stage, backbone_dir=str(other), **{**settings, "diffusion_steps": "ten"}) == (
        "error: --diffusion_steps must be an integer >= 0, got 'ten' (str).")
    assert bundle_error(stage, backbone_dir=str(refined_run / "nothing"), **settings) == (
        f"error: {refined_run / 'nothing' / 'model.pt'} does not exist: train a model first (configs/train.yaml) or "
        "point --backbone_dir at the folder that holds model.pt.")


# ---- without real data: overlays, the patch-size error, DRIVE's layout ----------------------------------------


def test_overlays_choose_network_and_decision():
    frunet = ["configs/vessel/frunet.yaml"]
    for files, network in ((TRAIN, "DropoutUNet"), (TRAIN + ["configs/vessel/unet.yaml"], "DropoutUNet"),
                           (TRAIN + frunet, "FullResolutionUNet"),
                           (INFER, "DropoutUNet"), (INFER + frunet, "FullResolutionUNet")):
        net = parse(files, device="cpu").get_parsed_content("network_def")
        assert type(net).__name__ == network and net.features == ((16, 32, 64, 128) if "Full" in network else
                                                                  (16, 32, 64, 128, 128))
    # the refiner wraps whichever backbone the network overlay chose, in either order, on every stack
    for files, backbone in ((TRAIN + REFINER, "DropoutUNet"), (TRAIN + frunet + REFINER, "FullResolutionUNet"),
                            (EVALUATE + REFINER + frunet, "FullResolutionUNet"), (INFER + REFINER, "DropoutUNet")):
        net = parse(files, device="cpu", direction_kernel=5).get_parsed_content("network_def")
        assert type(net).__name__ == "DiffusionRefiner" and type(net.backbone).__name__ == backbone
        assert net.head.kernel_size == (5, 5) and net.steps == 100 and net.backbone_window == 48
    for files in (EVALUATE, INFER):
        parser = parse(files + ["configs/vessel/dti.yaml"], dti_low=0.2)
        decision = parser.get_parsed_content("decision")
        assert type(decision).__name__ == "DualThresholdd" and decision.transform.low == 0.2
    # the evaluation's decision (argmax or DTI) feeds the one-hot masks, masked by the FOV, that the metrics read
    parser = parse(EVALUATE + ["configs/vessel/dti.yaml"])
    post = parser.get_parsed_content("validate#postprocessing")
    u = torch.zeros(1, 6, 5)
    u[0, 1, :] = torch.tensor([0.9, 0.4, 0.4, 0.2, 0.4])  # a vessel with a faint stretch, then a break
    fov = torch.ones(1, 6, 5)
    fov[0, :, 4] = 0
    logits = torch.log(torch.cat([1 - u, u]).clamp_min(1e-6))
    out = post({"pred": logits, "label": (u > 0.3).float(), "fov": fov})
    assert out["pred"].shape == (2, 6, 5) and out["pred"][1, 1].tolist() == [1, 1, 1, 0, 0]  # DTI, then the FOV
    assert out["label"][1, 1].tolist() == [1, 1, 1, 0, 0] and torch.equal(out["pred_fov"], fov)
    torch.testing.assert_close(out["prob"], torch.cat([1 - u, u]), atol=1e-5, rtol=0)


def test_a_patch_larger_than_an_image_is_named_before_training(tmp_path):
    root, data = _drive(tmp_path / "DRIVE", training=(21, 22), test=(1,)), tmp_path / "data"
    assert prepare(["--root", str(root), "--output", str(data), "--val-fraction", "0"]) == 0
    common = dict(dataset_dir=str(data), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"), num_workers=0)
    image = root / "training" / "images" / "21_training.tif"
    assert bundle_error(TRAIN, **common) == (
        f"error: --patch_size 48 is larger than training image {image} (36×40, H×W): every patch is cut from inside "
        "one image; pass --patch_size 32 or less.")
    assert bundle_error(TRAIN, patch_size=40, **common) == (
        "error: --patch_size must be a multiple of 16 (the U-Net pools four times), got 40.")
    assert bundle_error(TRAIN, patch_size="[32,32]", **common) == (
        "error: --patch_size must be an integer >= 16, got '[32,32]' (str).")
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_drive_layout_trains_the_full_resolution_network_and_evaluates_with_dti(tmp_path):
    with one_thread():
        _drive_run(tmp_path)


def _drive_run(tmp_path: Path) -> None:
    # DRIVE's official layout, generated (its licence forbids shipping it): shipped FOVs, 32-px patches of 40 × 36
    # frames, the full-resolution network, a difficulty pass at epoch 1, evaluation with DTI on the two test frames
    root, data = _drive(tmp_path / "DRIVE"), tmp_path / "data"
    assert prepare(["--root", str(root), "--output", str(data), "--val-fraction", "0"]) == 0
    frunet = ["configs/vessel/frunet.yaml"]
    common = ["--dataset_dir", str(data), "--ckpt_dir", str(tmp_path / "m"), "--features", "[4,8,16]",
              "--num_workers", "0", "--patch_size", "32"]
    run("-m", "monai.bundle", "run", "training", "--config_file", config_files(ADAPTIVE + frunet), *common,
        "--output_dir", str(tmp_path / "e"), "--epochs", "1", "--patches_per_image", "4", "--mc_start", "1",
        "--mc_samples", "2")
    table = torch.load(tmp_path / "m" / "checkpoint_final.pt", weights_only=True)["epsilon_table"]
    assert sorted(Path(name).name for name, _ in table["values"]) == [f"{i}_manual1.gif" for i in (21, 22, 23, 24)]
    run_bundle("run", "evaluating", "--config_file", config_files(EVALUATE + frunet + ["configs/vessel/dti.yaml"]),
               *common, "--output_dir", str(tmp_path / "r"))
    assert list(read_raw(tmp_path / "r", "cldice")) == ["01_test.tif", "02_test.tif"]
    assert list(read_metrics(tmp_path / "r")) == list(VESSEL_METRICS)
