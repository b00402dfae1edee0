"""The loss-comparison study runner (benchmarks/study.py): runs, ordering, resume, and the report's numbers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from conftest import BUNDLE_ROOT, TINY_OVERRIDES, load_benchmark, read_evaluation, read_json, run
from scipy.stats import wilcoxon

STUDY = BUNDLE_ROOT / "benchmarks" / "study.py"


def test_study_trains_orders_resumes_and_reports(demo, tmp_path):
    spec = {
        "budget": {**TINY_OVERRIDES, "epochs": 2, "mc_start": 1, "mc_interval": 1, "mc_samples": 2},
        "splits": {"demo": str(demo)},
        "seeds": [0],
        "baseline": "dice",
        "methods": {
            "dice": {"configs": ["configs/loss/dice.yaml"]},
            "adaptive": {"configs": ["configs/loss/adaptive_polydice1.yaml"]},
            "fixed_mean": {"configs": ["configs/loss/polydice1.yaml"], "eps_from": "adaptive"},
        },
        "select": {"best": {"label": "best fixed", "from": ["dice", "fixed_mean"]}},
    }
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "out"
    proc = run(str(STUDY), str(study_file), "--output", str(out), "--jobs", "2")
    assert "[  3/3] done" in proc.stdout

    # the fixed-eps control trains at the mean eps the adaptive run ended with
    history = list(csv.DictReader(open(out / "demo" / "adaptive" / "seed0" / "train" / "difficulty_history.csv")))
    last = max(int(r["pass"]) for r in history)
    final_mean = np.mean([float(r["eps"]) for r in history if int(r["pass"]) == last])
    fixed = out / "demo" / "fixed_mean" / "seed0"
    assert read_json(fixed / "run.json")["eps"] == pytest.approx(final_mean)
    assert f"--eps={read_json(fixed / 'run.json')['eps']}" in (fixed / "train.log").read_text()

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["dice", "adaptive", "fixed_mean", "best"]
    for r in rows[:3]:
        test = read_evaluation(out / "demo" / r["method"] / "seed0" / "test")
        val = read_evaluation(out / "demo" / r["method"] / "seed0" / "validation", split="validation")
        for metric in ("dice", "iou", "precision", "recall"):
            assert float(r[f"{metric}_mean"]) == pytest.approx(test["metrics"][metric], abs=1e-5)
        assert float(r["val_dice_mean"]) == pytest.approx(val["metrics"]["dice"], abs=1e-5)
    best = max(rows[::2][:2], key=lambda r: float(r["val_dice_mean"]))  # chosen on validation, among dice/fixed
    assert rows[3]["label"].endswith(best["label"]) and rows[3]["dice_mean"] == best["dice_mean"]
    assert "| dice | 1 |" in (out / "results_tables.md").read_text()
    for png in ("dice_boxplot_demo.png", "eps_over_training_demo.png"):
        assert (out / png).stat().st_size > 5000

    # started again: finished runs are kept; a run cut short after its first epoch resumes from that checkpoint
    dice = out / "demo" / "dice" / "seed0"
    for name in ("checkpoint_final.pt", "checkpoint_epoch=2.pt"):
        (dice / "models" / name).unlink()
    (dice / "run.json").write_text(json.dumps({"train_attempts": 1, "train_seconds": 1.0}))
    proc = run(str(STUDY), str(study_file), "--output", str(out), "--jobs", "2")
    assert "2 already done, 1 to run" in proc.stdout
    log = (dice / "train.log").read_text().split("\n$ ")[-1]
    assert "--resume=True" in log and "resuming from iteration" in log and "epoch 1" in log
    assert read_json(dice / "run.json")["train_attempts"] == 2


def test_paired_comparison_pairs_images_by_name_and_averages_seeds():
    study = load_benchmark("study.py")
    rng = np.random.default_rng(0)
    images = [f"img{i:02d}.png" for i in range(30)]
    base = {i: rng.uniform(0.5, 0.9, 2).tolist() for i in images}  # two seeds
    other = {i: (np.array(v) + rng.normal(0.03, 0.05, 2)).tolist() for i, v in base.items()}
    shuffled = dict(reversed(list(other.items())))  # another order: pairing must go by name

    def entry(per_image):
        summary = {m: 0.7 for m in study.METRICS}
        return {"seeds": [0, 1], "test": [summary, summary], "val_dice": [0.7, 0.7], "images": per_image,
                "train_minutes": [1.0, 1.0], "eps": []}

    spec = {"baseline": "base", "methods": {"base": {}, "other": {}}, "splits": {"s": ""}}
    rows = study.table_rows(spec, {"s": {"base": entry(base), "other": entry(shuffled)}})
    a = np.array([np.mean(other[i]) for i in images])
    b = np.array([np.mean(base[i]) for i in images])
    assert rows[1]["wilcoxon_p"] == pytest.approx(wilcoxon(a, b).pvalue)
    assert rows[1]["median_dice_diff"] == pytest.approx(np.median(a - b))
    assert rows[0]["wilcoxon_p"] == ""  # the baseline is not compared with itself

    # a method may name its own baseline (the networks study: each network's adaptive run against its Dice run)
    third = {i: (np.array(v) - rng.normal(0.02, 0.05, 2)).tolist() for i, v in other.items()}
    spec["methods"] = {"base": {}, "other": {}, "third": {"baseline": "other"}}
    rows = study.table_rows(spec, {"s": {"base": entry(base), "other": entry(other), "third": entry(third)}})
    c = np.array([np.mean(third[i]) for i in images])
    assert rows[2]["wilcoxon_p"] == pytest.approx(wilcoxon(c, a).pvalue)
    assert rows[2]["median_dice_diff"] == pytest.approx(np.median(c - a))
    assert rows[1]["wilcoxon_p"] == pytest.approx(wilcoxon(a, b).pvalue)  # the others: the study's baseline
    assert study.baseline_label(spec) == "its baseline"


def test_evaluation_variants_are_rows_with_their_own_metrics_and_figure(tmp_path):
    """A study with named ``evaluations`` (the vessel study's argmax and DTI) reports one row per method and
    evaluation, the ``metrics`` it names, each compared with the baseline under the same evaluation, and tiles the
    ``figure`` image's topology pictures; read from files laid out as the bundle writes them."""
    from PIL import Image

    study = load_benchmark("study.py")
    spec = {"baseline": "a", "splits": {"s": ""}, "seeds": [0], "eval_splits": ["test"], "title": "T",
            "methods": {"a": {"label": "A"}, "b": {"label": "B"}},
            "evaluations": {"plain": {"label": "", "configs": []}, "dti": {"label": " + DTI", "configs": []}},
            "metrics": ["dice", "cldice", "breaks"], "lower": ["cldice"],
            "figure": {"image": "img0", "crop": [2, 1, 6, 4]}}
    runs = study.make_runs(spec, tmp_path)
    rng = np.random.default_rng(0)
    for r in runs:
        r.state = {"done": True, "train_seconds": 60.0}
        r.save_state()
        for ev in spec["evaluations"]:
            folder = study.eval_folder(r, "test", ev)
            (folder / "overlays").mkdir(parents=True)
            dice = {f"/data/img{i}.jpg": float(rng.uniform(0.5, 0.9)) for i in range(6)}
            for metric in ("dice", "cldice"):
                with open(folder / f"test_{metric}_raw.csv", "w") as f:
                    f.write("filename,class0,mean\n" + "".join(f"{k},{v},{v}\n" for k, v in dice.items()))
            (folder / "test_betti0_error_raw.csv").write_text("filename,class0,mean\n/data/img0.jpg,3,3\n")
            (folder / "metrics.csv").write_text(f"test_dice,{np.mean(list(dice.values()))}\ntest_cldice,0.5\n")
            Image.fromarray(np.full((8, 10, 3), 40 * len(ev), np.uint8)).save(folder / "overlays" / "img0_topology.png")
            (folder / "overlays" / "topology.csv").write_text("image,breaks,fragments,missed_fraction\n"
                                                             "/data/img0.jpg,3,10,0.1\n/data/img1.jpg,4,20,0.2\n")
    results = study.collect(spec, runs)
    assert list(results["s"]) == ["a+plain", "a+dti", "b+plain", "b+dti"]
    rows = study.table_rows(spec, results)
    assert [r["label"] for r in rows] == ["A", "A + DTI", "B", "B + DTI"]
    for row in rows:
        method, ev = row["method"].split("+")
        expected = study.read_metrics(tmp_path / "s" / method / "seed0" / f"test_{ev}")["dice"]
        assert row["dice_mean"] == pytest.approx(expected) and "iou_mean" not in row
        assert row["breaks_mean"] == 3.5  # the mean of topology.csv's rows
    base = results["s"]["a+dti"]
    assert rows[3]["median_dice_diff"] == pytest.approx(study.wilcoxon_vs(results["s"]["b+dti"], base)[0])
    assert rows[0]["wilcoxon_p"] == rows[1]["wilcoxon_p"] == ""  # the baseline's rows, each under its evaluation
    study.write_tables(rows, spec, tmp_path / "report")
    table = (tmp_path / "report" / "results_tables.md").read_text()
    assert "| method | seeds | Dice | clDice ↓ | Breaks | Δ median Dice vs a | Wilcoxon p | train min |" in table
    assert "val Dice" not in table
    written = study.plot(spec, results, runs, tmp_path / "report")
    assert [p.name for p in written] == ["dice_boxplot_s.png", "test_image_s.png"]
    assert Image.open(written[1]).size[0] > 400
    all_rows = Image.open(written[1]).size[1]
    spec["figure"]["rows"] = ["b+dti", "a+plain"]  # two panels: one row of the figure instead of two
    study.plot_test_image(spec, "s", [r for r in runs if r.seed == 0], tmp_path / "two.png")
    assert Image.open(tmp_path / "two.png").size[1] < 0.75 * all_rows


def test_a_second_stage_waits_for_its_backbone_and_each_run_gets_only_its_missing_evaluations(tmp_path, monkeypatch):
    """The refiner study's shape (benchmarks/study_refiner_cpu.yaml): a method trained on another's model
    (``backbone``), methods scored with their own subsets of the evaluations, evaluations with their own overrides,
    and an evaluation added to a finished run run alone."""
    study = load_benchmark("study.py")
    spec = {"baseline": "unet", "splits": {"s": ""}, "seeds": [0], "eval_splits": ["test"], "budget": {"epochs": 1},
            "methods": {"unet": {"evaluations": ["argmax"]},
                        "k9": {"backbone": "unet", "configs": ["configs/vessel/refiner.yaml"],
                               "overrides": {"diffusion_steps": 10}, "evaluations": ["n100", "n1000"]}},
            "evaluations": {"argmax": {"label": "", "configs": []},
                            "n100": {"label": ", N = 100", "configs": [], "overrides": {"diffusion_steps": 100}},
                            "n1000": {"label": ", N = 1000", "configs": [], "overrides": {"diffusion_steps": 1000}}}}
    unet, k9 = study.make_runs(spec, tmp_path)
    assert k9.depends_on == "unet" and unet.depends_on is None
    assert [row for row, *_ in study.report_rows(spec)] == ["unet+argmax", "k9+n100", "k9+n1000"]
    assert study.chained_overrides(k9, spec, tmp_path, {}) == {"backbone_dir": str(tmp_path / "s/unet/seed0/models")}
    k9.state = {"trained": True, "done": True, "train_seconds": 1.0}
    k9.save_state()
    (study.eval_folder(k9, "test", "n100")).mkdir(parents=True)
    (study.eval_folder(k9, "test", "n100") / "metrics.csv").write_text("test_dice,0.5\n")
    assert [name for _, name, _ in study.missing_evaluations(k9, spec)] == ["n1000"]
    commands = []
    monkeypatch.setattr(study, "execute", lambda command, log, env: commands.append(command) or 0.0)
    study.run_one(k9, spec, tmp_path, {})
    (command,) = commands  # no training, and only the missing evaluation
    assert command[4] == "evaluating" and "--diffusion_steps=1000" in command and "--epochs=1" in command
    assert f"--backbone_dir={tmp_path / 's/unet/seed0/models'}" in command
    assert f"--output_dir={study.eval_folder(k9, 'test', 'n1000')}" in command
