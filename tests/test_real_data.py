"""The whole bundle on real colonoscopy frames from ../shared/data: a Kvasir-SEG slice and the CVC-ClinicDB TIFFs."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch
from conftest import (BUNDLE_ROOT, CVC, EVALUATE, KVASIR, TINY, TINY_OVERRIDES, TRAIN, bundle_error, needs,
                      read_evaluation, read_json, run, run_bundle)
from monai.bundle import ConfigParser
from PIL import Image

from scripts.prepare_data import main as prepare_data

pytestmark = needs(KVASIR)


@pytest.fixture(scope="module")
def kvasir_slice(tmp_path_factory):
    """30 Kvasir-SEG pairs plus the 8 CVC-ClinicDB TIFF pairs, prepared with the bundle's command."""
    root = tmp_path_factory.mktemp("real")
    for sub in ("images", "masks"):
        (root / "frames" / sub).mkdir(parents=True)
        for path in sorted((KVASIR / sub).iterdir())[:30]:
            (root / "frames" / sub / path.name).symlink_to(path)
        if CVC.is_dir():
            for path in sorted((CVC / sub).iterdir()):
                (root / "frames" / sub / f"cvc_{path.name}").symlink_to(path)
    assert prepare_data(["--root", str(root / "frames"), "--output", str(root / "data")]) == 0
    return root


def test_training_pipeline_keeps_frame_and_mask_aligned(kvasir_slice):
    """The label the network sees equals the mask read independently (PIL / tifffile, H×W) and resized."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / TRAIN))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(kvasir_slice / "data"), "image_size": 64})
    transforms = parser.get_parsed_content("validate#preprocessing")
    items = [{"image": str(kvasir_slice / "data" / d["image"]), "label": str(kvasir_slice / "data" / d["label"])}
             for part in ("training", "test") for d in read_json(kvasir_slice / "data" / "datalist.json")[part]]
    for item in items[:4] + [i for i in items if i["image"].endswith(".tif")][:2]:
        out = transforms(dict(item))
        assert out["image"].shape == (3, 64, 64) and 0 <= out["image"].min() and out["image"].max() <= 1
        if item["label"].endswith(".tif"):
            raw = tifffile.imread(item["label"])
        else:
            raw = np.asarray(Image.open(item["label"]).convert("L"))
        expected = torch.nn.functional.interpolate(torch.as_tensor(raw > 127, dtype=torch.float32)[None, None],
                                                   size=(64, 64), mode="nearest")[0, 0].T  # PIL axes: (W, H)
        assert (out["label"][0] == expected).float().mean() > 0.97, item["label"]


def test_train_evaluate_and_infer_on_real_frames(kvasir_slice, trained):
    data, out = kvasir_slice / "data", kvasir_slice / "run"
    common = ["--dataset_dir", str(data), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), *TINY]
    # two runs in one folder: the demo run's files are there, and Kvasir-SEG is trained into the same folder
    shutil.copytree(trained / "models", out / "models")
    demo_best = (out / "models" / "model.pt").read_bytes()
    line = bundle_error([TRAIN], resume=True, epochs=2, dataset_dir=str(data), ckpt_dir=str(out / "models"),
                        output_dir=str(out / "eval"), **TINY_OVERRIDES)
    assert line.startswith(f"error: checkpoint {out / 'models' / 'checkpoint_final.pt'} belongs to another run (data: "
                           "26 training + 3 validation images")  # the demo's lists, against Kvasir-SEG's
    assert (out / "models" / "model.pt").read_bytes() == demo_best
    # the adaptive default from scratch, with a difficulty pass at the start of both epochs
    proc = run("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--epochs", "2", "--mc_start", "1",
               "--mc_interval", "1", "--mc_samples", "3", *common)
    (kept,) = (out / "models" / "previous").iterdir()
    assert (kept / "model.pt").read_bytes() == demo_best
    assert f"moved them to {kept}" in proc.stdout + proc.stderr
    assert "Epoch[1] Complete" in proc.stderr + proc.stdout  # trained from scratch, not resumed
    n_train = len(read_json(data / "datalist.json")["training"])
    rows = list(csv.DictReader(open(out / "eval" / "difficulty_history.csv")))
    assert [sum(r["pass"] == k for r in rows) for k in ("1", "2")] == [n_train, n_train]
    eps = [float(r["eps"]) for r in rows if r["pass"] == "2"]
    assert len(set(eps)) == n_train and 0.0 <= min(eps) < max(eps) <= 0.5  # each real frame its own eps
    assert (out / "eval" / "figures" / "epsilon_distribution.png").is_file()
    assert torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)["epsilon_table"]["num_passes"] == 2
    run_bundle("run", "evaluating", "--config_file", EVALUATE, *common)
    evaluation = read_evaluation(out / "eval")
    test_list = read_json(data / "datalist.json")["test"]
    assert sorted(evaluation["images"]) == sorted(os.path.normpath(data / d["image"]) for d in test_list)
    assert 0.0 <= evaluation["metrics"]["dice"] <= 1.0

    frames = kvasir_slice / "frames" / "images"
    run_bundle("run", "--config_file", "configs/inference.yaml", "--input_dir", str(frames),
               "--output_dir", str(out / "masks"), "--ckpt_dir", str(out / "models"), "--image_size", "32",
               "--features", "[4,8,8,16,16]", "--num_workers", "0")
    written = sorted(p.name for p in (out / "masks").iterdir())
    assert written == sorted(f"{p.stem}_mask.png" for p in frames.iterdir())
    for frame in list(frames.iterdir())[:5]:
        if frame.suffix == ".jpg":
            assert Image.open(out / "masks" / f"{frame.stem}_mask.png").size == Image.open(frame).size
    if CVC.is_dir():
        assert Image.open(out / "masks" / "cvc_1_mask.png").size == (384, 288)
