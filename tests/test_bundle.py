"""The bundle's commands, run as a user runs them, on the synthetic demo set."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import (BUNDLE_ROOT, EVAL_METRICS, EVALUATE, SHARED_DATA, TINY, TINY_OVERRIDES, TRAIN, parse,
                      read_evaluation, read_json, run, run_bundle, trained_network)
from monai.bundle import ConfigWorkflow
from PIL import Image


def test_training_writes_checkpoints_and_logs(trained):
    models = trained / "models"
    assert (models / "model.pt").is_file()
    assert (models / "checkpoint_epoch=2.pt").is_file()
    final = torch.load(models / "checkpoint_final.pt", weights_only=True)
    assert {"model", "optimizer", "trainer"} <= set(final)
    assert final["trainer"]["iteration"] == 2 * final["trainer"]["epoch_length"]
    assert list((trained / "eval").glob("events.out.tfevents.*")), "no TensorBoard log written"


def test_evaluation_matches_an_independent_computation(demo, trained, tmp_path):
    out = tmp_path / "eval"
    proc = run("-m", "monai.bundle", "run", "evaluating", "--config_file", EVALUATE, "--dataset_dir", str(demo),
               "--ckpt_dir", str(trained / "models"), "--output_dir", str(out), *TINY)
    evaluation = read_evaluation(out)
    by_name = evaluation["images"]
    test_list = read_json(demo / "datalist.json")["test"]
    assert len(by_name) == len(test_list) > 0
    # MetricsSaver's files and nothing else: no temporary file or folder is left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.csv", *(f"test_{m}_{kind}.csv" for m in EVAL_METRICS for kind in ("raw", "summary"))])

    # reference: the network run by hand on the evaluation inputs, metrics in float64 numpy
    parser = parse([TRAIN, "configs/evaluate.yaml"], dataset_dir=str(demo), device="cpu", **TINY_OVERRIDES)
    net = trained_network(trained, TRAIN)
    dataset = parser.get_parsed_content("validate#dataset")
    for item in dataset:
        with torch.no_grad():
            pred = net(item["image"][None]).argmax(1)[0].numpy().astype(bool)
        gt = item["label"][0].numpy().astype(bool)
        tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
        row = by_name[str(item["image"].meta["filename_or_obj"])]
        np.testing.assert_allclose(row["dice"], 2 * tp / (2 * tp + fp + fn), atol=1e-5)
        np.testing.assert_allclose(row["iou"], tp / (tp + fp + fn), atol=1e-5)
        np.testing.assert_allclose(row["recall"], tp / (tp + fn), atol=1e-5)
        if tp + fp:  # precision and recall are ratios, not MONAI's confusion counts
            np.testing.assert_allclose(row["precision"], tp / (tp + fp), atol=1e-5)
        else:
            assert np.isnan(row["precision"])
    for metric in EVAL_METRICS:
        values = np.array([r[metric] for r in by_name.values()])
        mean = np.nanmean(values)
        np.testing.assert_allclose(evaluation["metrics"][metric], mean, atol=1e-5)
        summary = evaluation["summary"][metric]  # written with 4 decimals
        assert summary["notnans"] == np.isfinite(values).sum()
        np.testing.assert_allclose([summary["mean"], summary["median"], summary["std"], summary["max"]],
                                   [mean, np.nanmedian(values), np.nanstd(values), np.nanmax(values)], atol=1e-4)
        # the log reports the same per-image means (MONAI's ConfusionMatrix pools pixels unless compute_sample)
        logged = re.search(rf"test_{metric}: ([0-9.]+)", proc.stdout + proc.stderr).group(1)
        assert float(logged) == pytest.approx(mean, abs=1e-4), metric


def _frames(folder, demo):
    """Frames in every accepted format and colour layout, non-square among them."""
    folder.mkdir()
    rgb = Image.open(demo / "images" / "demo_001.jpg")  # 384 wide, 288 high
    assert rgb.size == (384, 288)
    rgb.save(folder / "wide.jpg")
    rgb.convert("L").save(folder / "grey.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.transpose(Image.Transpose.ROTATE_90).save(folder / "tall.bmp")
    shutil.copy(demo / "images" / "demo_000.jpg", folder / "square.jpg")
    if (SHARED_DATA / "cvc-clinicdb-sample").is_dir():
        shutil.copy(SHARED_DATA / "cvc-clinicdb-sample" / "images" / "1.tif", folder / "cvc.tif")
    return sorted(folder.iterdir())


def test_inference_writes_a_mask_per_frame_at_its_original_size(demo, trained, tmp_path):
    frames = _frames(tmp_path / "in", demo)
    out = tmp_path / "out"
    run_bundle("run", "--config_file", "configs/inference.yaml", "--input_dir", str(tmp_path / "in"),
               "--output_dir", str(out), "--ckpt_dir", str(trained / "models"), "--image_size", "32",
               "--features", "[4,8,8,16,16]", "--num_workers", "0")
    for frame in frames:
        mask = Image.open(out / f"{frame.stem}_mask.png")
        height, width = tifffile.imread(frame).shape[:2] if frame.suffix == ".tif" else Image.open(frame).size[::-1]
        assert mask.size == (width, height), frame.name
        assert set(np.unique(np.asarray(mask))) <= {0, 255}, frame.name

    # reference for the wide frame: the network by hand, probabilities resized back with torch
    net = trained_network(trained)
    image = torch.as_tensor(np.asarray(Image.open(tmp_path / "in" / "wide.jpg")), dtype=torch.float32) / 255
    x = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(32, 32), mode="area")
    with torch.no_grad():
        prob = torch.softmax(net(x), 1)
    prob = torch.nn.functional.interpolate(prob, size=(288, 384), mode="bilinear", align_corners=False)
    expected = prob.argmax(1)[0].numpy() * 255
    written = np.asarray(Image.open(out / "wide_mask.png"))
    assert written.shape == expected.shape == (288, 384)
    assert (written == expected).mean() > 0.95


def test_mc_inference_writes_maps_nifti_and_a_csv_row_per_frame(demo, trained, tmp_path):
    import nibabel as nib

    frames = _frames(tmp_path / "in", demo)
    out = tmp_path / "out"
    run_bundle("run", "--config_file", "configs/inference.yaml", "--input_dir", str(tmp_path / "in"),
               "--output_dir", str(out), "--ckpt_dir", str(trained / "models"), "--image_size", "32",
               "--features", "[4,8,8,16,16]", "--num_workers", "0", "--mc_samples", "4")
    rows = {Path(r["image"]).name: r for r in csv.DictReader(open(out / "uncertainty.csv"))}
    assert sorted(rows) == sorted(f.name for f in frames)
    for frame in frames:
        height, width = tifffile.imread(frame).shape[:2] if frame.suffix == ".tif" else Image.open(frame).size[::-1]
        mask = np.asarray(Image.open(out / f"{frame.stem}_mask.png")).T > 0  # PNG (H, W) -> PIL order (W, H)
        maps = {k: np.asarray(nib.load(out / f"{frame.stem}_{k}.nii.gz").dataobj)
                for k in ("probability", "variance", "entropy", "mutual_information")}
        assert all(m.shape == (width, height) and m.dtype == np.float32 for m in maps.values()), frame.name
        assert Image.open(out / f"{frame.stem}_mutual_information.png").size == (width, height)
        np.testing.assert_array_equal(mask, maps["probability"] >= 0.5)  # the mask is the mean prediction's
        assert maps["mutual_information"].min() > -1e-5 and maps["entropy"].max() <= np.log(2) + 1e-5
        assert (maps["mutual_information"] <= maps["entropy"] + 1e-5).all()  # epistemic part of the total
        row = rows[frame.name]
        assert (int(row["width"]), int(row["height"]), int(row["area_pixels"])) == (width, height, mask.sum())
        if mask.any():
            assert float(row["mean_mi_foreground"]) == pytest.approx(maps["mutual_information"][mask].mean(),
                                                                     rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("overlay,loss_type", [
    ("dice", "DiceLoss"), ("focal", "FocalLoss"), ("polydice1", "PolyDiceLoss"),
    ("generalized_dice", "GeneralizedDiceLoss"), ("dice_focal", "DiceFocalLoss"), ("dice_hausdorff", "WeightedSumLoss"),
])
def test_loss_overlays(overlay, loss_type, demo, tmp_path):
    from monai.bundle import ConfigWorkflow

    extra = {"eps": 0.3} if overlay == "polydice1" else {}
    # in this process, as `monai.bundle run training` runs it (a subprocess would spend most of its time importing)
    workflow = ConfigWorkflow(config_file=[str(BUNDLE_ROOT / TRAIN), str(BUNDLE_ROOT / f"configs/loss/{overlay}.yaml")],
                              workflow_type="train", bundle_root=str(BUNDLE_ROOT), dataset_dir=str(demo), epochs=1,
                              ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"), **TINY_OVERRIDES, **extra)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert (tmp_path / "m" / "model.pt").is_file()
    parser = parse([TRAIN, f"configs/loss/{overlay}.yaml"], **extra)
    loss = parser.get_parsed_content("loss")
    assert type(loss).__name__ == loss_type
    if overlay == "polydice1":
        assert loss.eps == 0.3 and loss.order == 1
    if overlay == "dice":  # the per-image, squared-denominator baseline of method.md
        assert loss.batch is False and loss.squared_pred is True
    if overlay == "focal":
        assert loss.gamma == 2.0
    if overlay == "dice_hausdorff":
        assert [type(t).__name__ for t in loss.losses] == ["DiceLoss", "LogHausdorffDTLoss"]
    assert parser.get_parsed_content("adaptive") is False  # a fixed-shape baseline runs no difficulty pass


def test_adaptive_overlay_restores_the_adaptive_loss_after_another_overlay():
    parser = parse([TRAIN, "configs/loss/dice.yaml", "configs/loss/adaptive_polydice1.yaml"])
    loss = parser.get_parsed_content("loss")
    assert type(loss).__name__ == "AdaptivePolyDiceLoss" and loss.table is parser.get_parsed_content("epsilon_table")
    assert parser.get_parsed_content("adaptive") is True


def test_top_level_ids_are_honoured(demo):
    overrides = {"epochs": 7, "batch_size": 5, "image_size": 48, "num_workers": 0, "learning_rate": 0.02,
                 "features": [3, 5, 7, 9, 11], "dropout": 0.25, "val_interval": 3, "seed": 11, "device": "cpu",
                 "ckpt_dir": "/tmp/ck", "output_dir": "/tmp/out", "dataset_dir": str(demo)}
    parser = parse([TRAIN], **overrides)
    net = parser.get_parsed_content("network_def")
    assert net.features == (3, 5, 7, 9, 11) and net.dropout_enc.p == 0.25 and net.dropout_dec.p == 0.25
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == 0.02
    assert parser.get_parsed_content("datalist") == f"{demo}/datalist.json"
    assert parser.get_parsed_content("train#dataloader").batch_size == 5
    assert parser.get_parsed_content("train#trainer").state.max_epochs == 7
    resize = [t for t in parser.get_parsed_content("train#deterministic_transforms") if type(t).__name__ == "Resized"]
    assert tuple(resize[0].resizer.spatial_size) == (48, 48)
    # image_size [H, W]: the readers' arrays are (C, W, H), so Resized gets (W, H)
    resize = parse([TRAIN], image_size=[32, 48]).get_parsed_content("train#deterministic_transforms")[3]
    assert type(resize).__name__ == "Resized" and tuple(resize.resizer.spatial_size) == (48, 32)
    handlers = parser.get_parsed_content("train#handlers")
    assert [h for h in handlers if type(h).__name__ == "ValidationHandler"][0].interval == 3
    assert parser.get_parsed_content("train#checkpoint_saver").save_dir == "/tmp/ck"
    assert parser.get_parsed_content("ckpt_dir") == "/tmp/ck" and parser.get_parsed_content("output_dir") == "/tmp/out"


def test_train_config_has_the_model_zoo_properties(demo, tmp_path):
    workflow = ConfigWorkflow(config_file=str(BUNDLE_ROOT / TRAIN), workflow_type="train",
                              meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
                              logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
                              bundle_root=str(BUNDLE_ROOT), dataset_dir=str(demo), ckpt_dir=str(tmp_path),
                              **TINY_OVERRIDES)
    workflow.initialize()
    assert workflow.check_properties() == []  # every required Model Zoo train property is declared


def test_resume_continues_from_the_last_checkpoint(demo, trained, tmp_path):
    common = ["--config_file", TRAIN, "--dataset_dir", str(demo), "--ckpt_dir", str(tmp_path / "m"),
              "--output_dir", str(tmp_path / "e"), *TINY]
    # the session's 2-epoch run, continued in a copy of its folders
    shutil.copytree(trained / "models", tmp_path / "m")
    shutil.copytree(trained / "eval", tmp_path / "e")
    resumed = run("-m", "monai.bundle", "run", "training", *common, "--epochs", "3", "--resume", "True")
    log = resumed.stdout + resumed.stderr
    assert "Restored all variables from" in log
    assert "Epoch[3] Complete" in log and "Epoch[1] Complete" not in log and "Epoch[2] Complete" not in log
    # the console: no log line per iteration under the progress bar, no warning from the bundle's own files
    assert " Iter: " not in log and "deprecated name" not in log and "worker processes in total" not in log
    state = torch.load(tmp_path / "m" / "checkpoint_final.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 3 * state["trainer"]["epoch_length"]
    # the run kept its own two epoch checkpoints (not two more), and its best score so far: model.pt is replaced
    # only by a better model after a resume
    assert sorted(p.name for p in (tmp_path / "m").glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt",
                                                                                      "checkpoint_epoch=3.pt"]
    (best,) = state["best_model_saver"]["key_metric"]["_saved"]
    assert 0.0 <= best[0] <= 1.0 and state["run_identity"]["run_id"] == read_json(tmp_path / "m" / "run.json")["run_id"]


def test_run_id_run_and_no_validation_data_still_saves_the_model(demo, tmp_path):
    datalist = read_json(demo / "datalist.json")
    datalist["training"] += datalist.pop("validation")
    datalist["validation"] = []
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    (data / "datalist.json").write_text(json.dumps(datalist))
    run("-m", "monai.bundle", "run", "--config_file", TRAIN, "--dataset_dir", str(data), "--epochs", "1",
        "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(tmp_path / "e"), *TINY)
    assert (tmp_path / "m" / "model.pt").is_file()


def test_metadata_verifies_and_torchscript_export_matches(trained, torchscript):
    schema = SHARED_DATA.parent / "schemas" / "meta_schema_20240725.json"
    if schema.is_file():
        run_bundle("verify_metadata", "--meta_file", "configs/metadata.json",
                   "--filepath", str(schema))
    assert (BUNDLE_ROOT / "metadata.json").is_symlink()
    assert (BUNDLE_ROOT / "metadata.json").resolve() == (BUNDLE_ROOT / "configs" / "metadata.json").resolve()
    run_bundle("verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
               "--config_file", "configs/inference.yaml", "--features", "[4,8,8,16,16]")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(torchscript)).eval()(x), trained_network(trained)(x))


def test_multi_gpu_evaluate_config_matches_single_process_evaluation(demo, trained, tmp_path):
    import subprocess
    import sys

    common = ["--dataset_dir", str(demo), "--ckpt_dir", str(trained / "models"), *TINY]
    run_bundle("run", "evaluating", "--config_file", EVALUATE, "--output_dir", str(tmp_path / "one"),
               *common)
    files = "['configs/train.yaml','configs/evaluate.yaml','configs/multi_gpu_evaluate.yaml']"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29525", "-m",
         "monai.bundle", "run", "evaluating", "--config_file", files, "--backend", "gloo", "--device", "cpu",
         "--output_dir", str(tmp_path / "two"), *common],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one, two = read_evaluation(tmp_path / "one"), read_evaluation(tmp_path / "two")
    # every image's values under its own name: the names MetricsSaver gathers match the details MONAI gathers
    assert two["images"] == one["images"] and len(one["images"]) == len(read_json(demo / "datalist.json")["test"])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for metric in EVAL_METRICS:  # float32 sums in another image order
        assert two["metrics"][metric] == pytest.approx(one["metrics"][metric], rel=1e-5)
        assert two["summary"][metric] == pytest.approx(one["summary"][metric], abs=1.5e-4)  # 4 decimals
