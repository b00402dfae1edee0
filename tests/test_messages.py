"""
Bad input ends with one plain sentence of the bundle's own: the last line a user sees names the file or id, what
is wrong and what to do. Most cases run the workflow in this process (``bundle_error``: the line the exception
hook prints); the first tests check with real commands that the hook makes it the last line.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from conftest import EVALUATE, TINY, TINY_OVERRIDES, TRAIN, bundle_error, last_line, run

EVAL_FILES = ["configs/train.yaml", "configs/evaluate.yaml"]


def test_a_bad_override_ends_training_with_one_line_and_no_checkpoint(tmp_path):
    proc = run("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--ckpt_dir", str(tmp_path),
               *TINY, "--epochs", "ten", check=False)
    assert proc.returncode != 0
    assert last_line(proc) == "error: --epochs must be an integer >= 1, got 'ten' (str)."
    assert "Failed to evaluate" not in proc.stderr and not list(tmp_path.iterdir())


def test_a_truncated_model_ends_evaluation_with_one_line(demo, trained, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    data = (trained / "models" / "model.pt").read_bytes()
    (models / "model.pt").write_bytes(data[: len(data) // 2])  # what an in-place write killed half-way leaves
    proc = run("-m", "monai.bundle", "run", "evaluating", "--config_file", EVALUATE, "--dataset_dir", str(demo),
               "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "eval"), *TINY, check=False)
    assert proc.returncode != 0
    assert last_line(proc) == (f"error: {models / 'model.pt'} cannot be read: it was cut short by a crash or is not "
                               f"a PyTorch file (OSError); restore it (see {models / 'previous'}) or train again.")


@pytest.mark.parametrize("overrides,line", [
    ({"features": [8, 16]}, 'error: --features must be a list of five positive integers, e.g. "[64,128,256,512,512]"'
                            ", got [8, 16] (list)."),
    ({"resume": "true"}, "error: --resume must be True or False (capitalised: --resume True), got 'true' (str)."),
    ({"deterministic": 1}, "error: --deterministic must be True or False (capitalised), got 1 (int)."),
    ({"image_size": 100}, 'error: --image_size must be a multiple of 16 (the U-Net pools four times), or a pair '
                          '"[H,W]" of them, got 100 (int).'),
    ({"image_size": [64, 60]}, 'error: --image_size must be a multiple of 16 (the U-Net pools four times), or a '
                               'pair "[H,W]" of them, got [64, 60] (list).'),
    ({"eps_min": 0.4, "eps_max": 0.1}, "error: --eps_min (0.4) must not exceed --eps_max (0.1)."),
    ({"difficulty#scorer#empty": "skip"}, "error: UncertaintyDifficulty empty must be one of zero, image_mean, "
                                          "got 'skip'."),
    ({"difficulty#eps_map#slope": "two"}, "error: EpsilonMap slope must be a number in [0.0, inf], got 'two' (str)."),
    ({"difficulty#eps_map#assignment": "random"}, "error: EpsilonMap assignment must be one of ranked, shuffled, got "
                                                  "'random'."),
    ({"mc_interval": 0}, "error: DifficultyPass interval (--mc_interval) must be an integer >= 1, got 0 (int)."),
    ({"mc_samples": 1}, "error: DifficultyPass num_samples (--mc_samples) must be an integer >= 2, got 1 (int)."),
    ({"mc_chunk_size": 0}, "error: --mc_chunk_size must be auto or an integer >= 1, got 0 (int)."),
    ({"dropout_type": "spatial"}, "error: --dropout_type must be one of element, channel, got 'spatial'."),
    ({"dropout_at": "output"}, "error: --dropout_at must be a non-empty list of places among bottleneck, output, e.g. "
                               "\"[bottleneck,output]\", got 'output' (str)."),
    ({"difficulty#pass#audit_ranking": "dice"}, "error: DifficultyPass audit_ranking must be one of dice_error, "
                                                "dice_error_certainty, got 'dice'."),
    ({"dropout": 0.0}, "error: --dropout 0 makes every dropout sample the same, so the difficulty pass would give "
                       "every image the same eps: train with --dropout > 0, or use a fixed-shape loss overlay "
                       "(configs/loss/*.yaml)."),
])
def test_bad_overrides_fail_before_any_work(overrides, line, demo, tmp_path):
    assert bundle_error([TRAIN], dataset_dir=str(demo), ckpt_dir=str(tmp_path),
                        **{**TINY_OVERRIDES, **overrides}) == line
    assert not list(tmp_path.iterdir())


def test_bad_data_fails_before_training_naming_the_file(demo, tmp_path):
    common = dict(ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"), **TINY_OVERRIDES)
    line = bundle_error([TRAIN], dataset_dir=str(tmp_path / "nowhere"), **common)
    assert line.startswith(f"error: datalist {tmp_path / 'nowhere' / 'datalist.json'} does not exist; create it with")
    data = tmp_path / "data"
    shutil.copytree(demo, data)
    text = (demo / "datalist.json").read_text()
    (data / "datalist.json").write_text(text.replace("}", "}}", 1))
    assert bundle_error([TRAIN], dataset_dir=str(data), **common).startswith(
        f"error: datalist {data / 'datalist.json'} is not valid JSON: ")
    (data / "datalist.json").write_text(text)
    victim = data / json.loads(text)["training"][3]["image"]
    victim.unlink()
    line = bundle_error([TRAIN], dataset_dir=str(data), **common)
    assert str(victim) in line and "does not exist" in line
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").glob("*.pt"))  # nothing trained


def test_resume_without_a_checkpoint_says_so(demo, tmp_path):
    line = bundle_error([TRAIN], dataset_dir=str(demo), ckpt_dir=str(tmp_path), resume=True, **TINY_OVERRIDES)
    assert line == (f"error: --resume True was given but {tmp_path} holds no readable checkpoint_epoch=N.pt or "
                    "checkpoint_final.pt: train without --resume.")


def test_evaluation_checks_model_pt_before_it_starts(demo, trained, tmp_path):
    common = dict(dataset_dir=str(demo), ckpt_dir=str(tmp_path), output_dir=str(tmp_path / "eval"))
    assert bundle_error(EVAL_FILES, **common, **TINY_OVERRIDES) == (
        f"error: {tmp_path / 'model.pt'} does not exist: train a model first (configs/train.yaml) or point --ckpt_dir "
        "at the folder that holds model.pt.")
    for name in ("model.pt", "run.json"):
        shutil.copy(trained / "models" / name, tmp_path / name)
    # evaluated without the overrides it was trained with: one line naming them, not a size-mismatch traceback
    line = bundle_error(EVAL_FILES, **common)
    assert line.endswith('pass --image_size 32 --features "[4,8,8,16,16]".')
    # a checkpoint holding arbitrary Python objects is refused by weights_only loading, naming the file
    with open(tmp_path / "model.pt", "wb") as f:
        torch.save({"inc.conv_0.conv.weight": torch.zeros(1), "note": pickle.PickleError("x")}, f)
    line = bundle_error(EVAL_FILES, **common, **TINY_OVERRIDES)
    assert line.startswith(f"error: {tmp_path / 'model.pt'} holds Python objects that weights_only loading refuses")


def test_an_error_in_a_dataloader_worker_keeps_its_message(tmp_path):
    """A worker's exception reaches the main process as text only: the sentence is still found in it."""
    import monai
    from monai.transforms import LoadImaged

    from scripts.data import PILTiffReader
    from scripts.errors import user_message

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a JPEG")
    dataset = monai.data.Dataset([{"image": str(bad)}], LoadImaged("image", reader=PILTiffReader(mode="RGB")))
    with pytest.raises(Exception) as info:
        list(monai.data.DataLoader(dataset, num_workers=1))
    assert user_message(info.value).startswith(f"cannot read image file {bad}: it is not an image file")


def test_inference_names_the_overrides_the_model_was_trained_with(demo, trained, tmp_path):
    line = bundle_error(["configs/inference.yaml"], input_dir=str(demo / "images"), output_dir=str(tmp_path),
                        ckpt_dir=str(trained / "models"), num_workers=0)
    assert line == (f'error: {trained / "models" / "model.pt"} was trained with --image_size 32 --features '
                    f'"[4,8,8,16,16]" (recorded in {trained / "models" / "run.json"}) but this command has '
                    '--image_size 224 --features "[64,128,256,512,512]": pass --image_size 32 --features '
                    '"[4,8,8,16,16]".')
    assert not list(tmp_path.iterdir())  # nothing written
