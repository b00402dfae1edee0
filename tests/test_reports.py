# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""The evaluation report's names and what a new evaluation does with an earlier one's files (scripts.reports)."""

from __future__ import annotations

import csv
import logging
import os

import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import AsDiscreted

from scripts.errors import InputError
from scripts.files import set_aside
from scripts.reports import AtomicMetricsSaver


def evaluate(folder, split: str, keep_previous: int = 5, metrics=("test_dice",)) -> None:
    """A MONAI evaluator over two 4×4 one-hot "images" (the network passes them through) with an AtomicMetricsSaver."""
    items = []
    for name, fill in (("a.png", 4), ("b.png", 8)):
        label = torch.zeros(1, 4, 4)
        label.view(-1)[:fill] = 1
        image = MetaTensor(torch.cat([1 - label, label]), meta={"filename_or_obj": name})
        items.append({"image": image, "label": label})
    as_pair = from_engine(["pred", "label"])
    handlers = {m: MeanDice(include_background=False, save_details=True, output_transform=as_pair) for m in metrics}
    saver = AtomicMetricsSaver(save_dir=str(folder), metrics="*", metric_details="*", split=split,
                               keep_previous=keep_previous, summary_ops="*",
                               batch_transform=lambda x: [xx["image"].meta for xx in x])
    first = next(iter(handlers))
    SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(items, batch_size=2),
                        network=torch.nn.Identity(), key_val_metric={first: handlers.pop(first)},
                        additional_metrics=handlers or None, val_handlers=[saver],
                        postprocessing=AsDiscreted(keys="label", to_onehot=2)).run()


def logged(caplog) -> list[str]:
    """What scripts.files logged (MONAI's engines log too)."""
    return [r.getMessage() for r in caplog.records if r.name == "scripts.files"]


def test_reports_are_named_by_the_list_scored_and_an_earlier_evaluation_is_set_aside(tmp_path, caplog):
    evaluate(tmp_path, "test", metrics=("test_dice", "test_other"))
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "test_dice_raw.csv", "test_dice_summary.csv",
                                             "test_other_raw.csv", "test_other_summary.csv"]
    with caplog.at_level(logging.WARNING, logger="scripts.files"):
        evaluate(tmp_path, "validation")
    # the validation report only, under its own names; the test report whole in previous/
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "previous", "validation_dice_raw.csv",
                                             "validation_dice_summary.csv"]
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [row[0] for row in csv.reader(f)] == ["validation_dice"]
    (earlier,) = (tmp_path / "previous").iterdir()
    assert earlier.name.startswith("evaluation-")
    assert sorted(os.listdir(earlier)) == ["metrics.csv", "test_dice_raw.csv", "test_dice_summary.csv",
                                           "test_other_raw.csv", "test_other_summary.csv"]
    assert logged(caplog) == [f"{tmp_path} held the files of an earlier evaluation (metrics.csv, test_dice_raw.csv, "
                              "test_dice_summary.csv, test_other_raw.csv, test_other_summary.csv); moved them to "
                              f"{earlier}."]


def test_only_the_newest_earlier_folders_are_kept_and_the_log_names_the_removed(tmp_path, caplog):
    for n in range(4):
        (tmp_path / f"run{n}.txt").write_text(str(n))
        set_aside(tmp_path, ["run*.txt"], "run", keep=2)
    kept = sorted((tmp_path / "previous").iterdir(), key=lambda p: p.stat().st_mtime)
    # two in one second get distinct names; the newest two are kept, each holding what it was given
    assert [(p / os.listdir(p)[0]).read_text() for p in kept] == ["2", "3"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scripts.files"):
        (tmp_path / "run4.txt").write_text("4")
        set_aside(tmp_path, ["run*.txt"], "run", keep=1)
    (newest,) = (tmp_path / "previous").iterdir()
    assert (newest / "run4.txt").read_text() == "4"
    assert logged(caplog)[-1] == (f"removed 2 older folder(s) of {tmp_path / 'previous'} to keep the newest 1 "
                                  f"(--keep_previous): {', '.join(p.name for p in kept)}.")
    assert set_aside(tmp_path, ["nothing*"], "run") is None


@pytest.mark.parametrize("split, keep, message", [
    ("test data", 5, "--eval_split must be a datalist key such as test or validation, got 'test data'."),
    ("test", "2", "--keep_previous must be an integer >= 0, got '2' (str)."),
])
def test_bad_settings_are_named(split, keep, message, tmp_path):
    with pytest.raises(InputError) as info:
        AtomicMetricsSaver(save_dir=str(tmp_path), split=split, keep_previous=keep)
    assert str(info.value) == message
