# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
A loss comparison study run with the bundle itself: every method of a study file × every seed × every data split
is trained with ``python -m monai.bundle run training`` and scored with ``evaluating`` on the split's validation
list (to choose settings) and its test list (to report), all under the study's one shared budget of overrides.

    python benchmarks/study.py benchmarks/study_kvasir_cpu.yaml --output runs/study --jobs 2 --threads 1
    python benchmarks/study.py benchmarks/study_kvasir_cpu.yaml --output runs/study --report-only --report docs/results

Runs go side by side (``--jobs``; on a GPU they share it), each in ``<output>/<split>/<method>/seed<k>/``
(``models/``, ``train/`` with the difficulty history, ``validation/`` and ``test/`` with the evaluation's MONAI
``MetricsSaver`` files (``metrics.csv``, ``test_<metric>_raw.csv`` and ``_summary.csv``), logs and ``run.json``).
Started again, the study skips finished runs and resumes a run cut short from its last checkpoint (``--resume
True``). A method with ``eps_from: <adaptive method>`` trains PolyDice-1 at the mean ε the adaptive run of the same
split and seed ended with, so it starts when that run has finished; one with ``backbone: <method>`` is a second
stage on that method's model of the same split and seed (``--backbone_dir``, configs/vessel/train_refiner.yaml) and
waits for it likewise. A run is scored with each evaluation whose folder has no ``metrics.csv`` yet, so an evaluation
added to a finished study runs alone.

The report (``--report``, default ``<output>``) is ``results.md`` and ``results.csv``: per split, the mean ± std over
seeds of test Dice, IoU, precision and recall, the Wilcoxon signed-rank test of each method against the baseline
over the test images (per-image Dice averaged over seeds, paired by image), the training time; the study's
``select`` rows pick, per split, the candidate with the best mean validation Dice. Plots: per-method box plots of
per-image test Dice, and the ε distribution over the passes of every adaptive method.

Study file (YAML): ``budget`` (overrides for every run), ``splits`` (name: prepared dataset_dir), ``seeds``,
``baseline`` (a method name), ``methods`` (name: ``label``, ``configs`` (overlays after configs/train.yaml),
``overrides``, ``eps_from``, ``backbone``, ``baseline``: the method it is tested against, if not the study's) and optionally ``select`` (name: ``label``, ``from`` (method names)).
Optional keys for another task (benchmarks/study_chase_cpu.yaml, the vessel study):

- ``evaluations`` (name: ``label``, ``configs``, ``overrides``): each trained run is scored once per entry, with
  configs/train.yaml, configs/evaluate.yaml, the method's overlays, then the entry's (configs/vessel/evaluate.yaml,
  configs/vessel/dti.yaml) and its overrides, into ``<split>_<name>/``; a report row per method and entry. A
  method's ``evaluations`` (a list of names) limits it to those. Default: one unnamed entry with no overlays, into
  ``<split>/``;
- ``metrics``: the ``test_<metric>`` means the report shows (default: dice, iou, precision, recall), and
  ``breaks`` and ``fragments`` per image from the vessel evaluation's ``overlays/topology.csv``; ``lower``: those
  of them for which lower is better;
- ``eval_splits``: the lists scored (default [validation, test]; without validation there is no ``select``);
- ``title``: the data set's name on the plots; ``figure`` (``image``: a test image's stem, ``crop``: [x, y, w, h]
  in its pixels, optionally ``rows``: the report rows to show, in order): the image's ground truth, then one panel
  per report row of that image's ``overlays/<stem>_topology.png`` (written by configs/vessel/evaluate.yaml) from the
  first seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
METRICS = ("dice", "iou", "precision", "recall")  # configs/evaluate.yaml's test_<metric>
METRIC_LABELS = {"dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall", "cldice": "clDice",
                 "vca": "VCA", "betti0_error": "Betti-0 error", "betti1_error": "Betti-1 error", "auc": "AUC",
                 "sensitivity": "Sensitivity", "specificity": "Specificity", "accuracy": "Accuracy",
                 "breaks": "Breaks", "fragments": "Fragments"}
NO_EVALUATIONS = {"": {"label": "", "configs": []}}


@dataclass
class Run:
    split: str
    method: str
    seed: int
    folder: Path
    depends_on: str | None = None  # method whose run of the same split and seed must finish first
    state: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.split}/{self.method}/seed{self.seed}"

    def load_state(self) -> dict:
        path = self.folder / "run.json"
        self.state = json.loads(path.read_text()) if path.exists() else {}
        return self.state

    def save_state(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "run.json").write_text(json.dumps(self.state, indent=2) + "\n")


def load_study(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    missing = {"budget", "splits", "seeds", "baseline", "methods"} - set(spec or {})
    if missing:
        raise SystemExit(f"{path}: missing key(s) {sorted(missing)}")
    methods = spec["methods"]
    for name, m in [("", {"baseline": spec["baseline"]}), *methods.items()]:
        if m.get("baseline", spec["baseline"]) not in methods:
            raise SystemExit(f"{path}: {'method ' + repr(name) + ': ' if name else ''}baseline "
                             f"{m['baseline']!r} is not one of the methods {sorted(methods)}")
    for name, m in methods.items():
        for overlay in m.get("configs", []):
            if not (BUNDLE_ROOT / overlay).is_file():
                raise SystemExit(f"{path}: method {name!r} names {overlay}, which does not exist")
        for key in ("eps_from", "backbone"):
            if m.get(key) and m[key] not in methods:
                raise SystemExit(f"{path}: method {name!r} takes {key} {m[key]!r}, which is not a method")
        unknown = set(m.get("evaluations", [])) - set(evaluations(spec))
        if unknown:
            raise SystemExit(f"{path}: method {name!r} names unknown evaluation(s) {sorted(unknown)}")
    for name, sel in (spec.get("select") or {}).items():
        unknown = set(sel["from"]) - set(methods)
        if unknown:
            raise SystemExit(f"{path}: select {name!r} names unknown method(s) {sorted(unknown)}")
    for name, ev in (spec.get("evaluations") or {}).items():
        for overlay in ev.get("configs", []):
            if not (BUNDLE_ROOT / overlay).is_file():
                raise SystemExit(f"{path}: evaluation {name!r} names {overlay}, which does not exist")
    if spec.get("select") and "validation" not in eval_splits(spec):
        raise SystemExit(f"{path}: select chooses on the validation list, which eval_splits leaves out")
    for split, folder in spec["splits"].items():
        if not (BUNDLE_ROOT / folder / "datalist.json").is_file():
            raise SystemExit(f"{path}: split {split!r}: {folder}/datalist.json not found; prepare it with "
                             "python -m scripts.prepare_data (see docs/README.md)")
    return spec


def evaluations(spec: dict, method: str | None = None) -> dict:
    """The study's evaluations, or those of ``method`` (its ``evaluations`` list, by default all)."""
    evs = spec.get("evaluations") or NO_EVALUATIONS
    chosen = spec["methods"][method].get("evaluations") if method else None
    return {k: v for k, v in evs.items() if chosen is None or k in chosen}


def eval_splits(spec: dict) -> list[str]:
    return spec.get("eval_splits", ["validation", "test"])


def eval_folder(run: Run, split: str, evaluation: str) -> Path:
    return run.folder / (f"{split}_{evaluation}" if evaluation else split)


def make_runs(spec: dict, output: Path) -> list[Run]:
    return [Run(split, method, seed, output / split / method / f"seed{seed}", m.get("eps_from") or m.get("backbone"))
            for split in spec["splits"] for seed in spec["seeds"] for method, m in spec["methods"].items()]


def cli_value(value) -> str:
    # what Python Fire (the bundle CLI) parses back to the same value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def final_mean_eps(train_dir: Path) -> float:
    """Mean ε over the images at the last difficulty pass of a run."""
    with open(train_dir / "difficulty_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    last = max(int(r["pass"]) for r in rows)
    return statistics.fmean(float(r["eps"]) for r in rows if int(r["pass"]) == last)


def bundle_command(run: Run, spec: dict, entry: str, overlays: list[str], extra: dict) -> list[str]:
    """``overlays`` follow configs/train.yaml; evaluation puts configs/evaluate.yaml first among them."""
    config = "[" + ",".join(f"'{c}'" for c in ["configs/train.yaml", *overlays]) + "]"
    settings = {**spec["budget"], **spec["methods"][run.method].get("overrides", {}), **extra,
                "seed": run.seed, "dataset_dir": str((BUNDLE_ROOT / spec["splits"][run.split]).resolve()),
                "ckpt_dir": str(run.folder / "models")}
    return [sys.executable, "-m", "monai.bundle", "run", entry, "--config_file", config,
            "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
            *(f"--{k}={cli_value(v)}" for k, v in settings.items())]


def execute(command: list[str], log: Path, env: dict) -> float:
    began = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        proc = subprocess.run(command, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"exit {proc.returncode}; log {log}:\n    " + "\n    ".join(tail))
    return time.perf_counter() - began


def chained_overrides(run: Run, spec: dict, output: Path, state: dict | None) -> dict:
    """What a run takes from the run of the same split and seed it depends on: ``--backbone_dir``, or ``--eps``
    (kept in ``state``; ``state=None``, a dry run: a placeholder)."""
    method = spec["methods"][run.method]
    other = output / run.split / (run.depends_on or "") / f"seed{run.seed}"
    if method.get("backbone"):
        return {"backbone_dir": str(other / "models")}
    if method.get("eps_from"):
        if state is None:
            return {"eps": f"<mean eps of {run.depends_on}>"}
        return {"eps": state.setdefault("eps", final_mean_eps(other / "train"))}
    return {}


def run_one(run: Run, spec: dict, output: Path, env: dict) -> Run:
    """Train (resuming a run cut short), then score on the validation and the test list."""
    state = run.load_state()
    method = spec["methods"][run.method]
    overlays = list(method.get("configs", []))
    extra = {"output_dir": str(run.folder / "train"), **chained_overrides(run, spec, output, state)}
    run.folder.mkdir(parents=True, exist_ok=True)
    if not state.get("trained"):
        resume = any((run.folder / "models").glob("*checkpoint_*.pt"))
        state["train_attempts"] = state.get("train_attempts", 0) + 1
        run.save_state()
        seconds = execute(bundle_command(run, spec, "training", overlays, {**extra, "resume": resume}),
                          run.folder / "train.log", env)
        state["train_seconds"] = state.get("train_seconds", 0.0) + seconds
        state["trained"] = True
        run.save_state()
    for split, name, ev in missing_evaluations(run, spec):
        execute(bundle_command(run, spec, "evaluating", ["configs/evaluate.yaml", *overlays, *ev["configs"]],
                               {**extra, **ev.get("overrides", {}), "eval_split": split,
                                "output_dir": str(eval_folder(run, split, name))}),
                run.folder / "evaluate.log", env)
    state["done"] = True
    run.save_state()
    return run


def missing_evaluations(run: Run, spec: dict) -> list[tuple[str, str, dict]]:
    """(split, name, entry) of each evaluation of ``run`` that has not written its metrics yet."""
    return [(split, name, ev) for split in eval_splits(spec) for name, ev in evaluations(spec, run.method).items()
            if not (eval_folder(run, split, name) / "metrics.csv").is_file()]


def run_study(spec: dict, runs: list[Run], output: Path, jobs: int, threads: int) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(BUNDLE_ROOT), os.environ.get("PYTHONPATH")]))}
    todo = [r for r in runs if not r.load_state().get("done") or missing_evaluations(r, spec)]
    # the runs others wait for go first
    needed = {r.depends_on for r in runs if r.depends_on}
    todo.sort(key=lambda r: (r.method not in needed, r.depends_on is not None))
    total, finished, failed, durations = len(todo), 0, [], []
    print(f"study: {len(runs)} runs, {len(runs) - total} already done, {total} to run, {jobs} at a time, "
          f"{threads} thread(s) each; logs in {output}/<split>/<method>/seed<k>/", flush=True)
    began, lock = time.perf_counter(), threading.Lock()
    done_names = {r.name for r in runs if r.state.get("done")}

    def ready(r: Run) -> bool:
        return r.depends_on is None or f"{r.split}/{r.depends_on}/seed{r.seed}" in done_names

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict = {}
        while todo or running:
            for r in [r for r in todo if ready(r)][: jobs - len(running)]:
                todo.remove(r)
                running[pool.submit(run_one, r, spec, output, env)] = (r, time.perf_counter())
                print(f"  start  {r.name}", flush=True)
            if not running:  # what is left waits for runs that failed
                for r in todo:
                    failed.append(r.name)
                    print(f"  skip   {r.name}: {r.depends_on} of its split and seed did not finish", flush=True)
                break
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                r, t0 = running.pop(future)
                with lock:
                    finished += 1
                    minutes = (time.perf_counter() - t0) / 60
                    elapsed = (time.perf_counter() - began) / 60
                    try:
                        future.result()
                        done_names.add(r.name)
                        durations.append(minutes)
                        dice = read_metrics(eval_folder(r, "test", next(iter(evaluations(spec, r.method)))))["dice"]
                        left = statistics.fmean(durations) * (total - finished) / jobs
                        print(f"[{finished:3d}/{total}] done   {r.name} in {minutes:.1f} min, test Dice {dice:.4f}"
                              f" | elapsed {elapsed:.1f} min, about {left:.0f} min left", flush=True)
                    except Exception as e:  # one failed run does not stop the study
                        failed.append(r.name)
                        print(f"[{finished:3d}/{total}] FAILED {r.name} after {minutes:.1f} min: {e}", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------------- the report
def read_metrics(folder: Path) -> dict[str, float]:
    """The mean over images of each metric that ``evaluating`` wrote to ``folder`` (MetricsSaver's ``metrics.csv``,
    ``test_dice,0.81`` lines; ``validation_dice`` for the validation list), by the names of METRICS:
    ``{"dice": 0.81, ...}``; with the vessel evaluation's ``overlays/topology.csv``, also the mean ``breaks`` and
    ``fragments`` per image."""
    with open(folder / "metrics.csv", newline="") as f:
        metrics = {name.split("_", 1)[1]: float(value) for name, value in csv.reader(f)}
    topology = folder / "overlays" / "topology.csv"
    if topology.is_file():
        with open(topology, newline="") as f:
            rows = list(csv.DictReader(f))
        metrics.update({k: statistics.fmean(float(r[k]) for r in rows) for k in ("breaks", "fragments")})
    return metrics


def per_image_dice(folder: Path) -> dict[str, float]:
    """{image: Dice} of one evaluation (MetricsSaver's ``test_dice_raw.csv``; NaN where undefined)."""
    with open(folder / "test_dice_raw.csv", newline="") as f:
        return {r["filename"]: float(r["mean"]) for r in csv.DictReader(f)}


def report_rows(spec: dict) -> list[tuple[str, str, str, str]]:
    """(row, method, evaluation, label) of each method × evaluation: the row is the method's name, or with named
    evaluations ``<method>+<evaluation>``."""
    return [(f"{m}+{ev}" if ev else m, m, ev, spec["methods"][m].get("label", m) + e.get("label", ""))
            for m in spec["methods"] for ev, e in evaluations(spec, m).items()]


def collect(spec: dict, runs: list[Run]) -> dict:
    """{split: {row: {"seeds": [...], "test": [{metric: mean}...], "val_dice": [...], "images": {image: [dice...]},
    ...}}}, one list item per seed (rows: :func:`report_rows`)"""
    results: dict = {s: {} for s in spec["splits"]}
    validation = "validation" in eval_splits(spec)
    for r in runs:
        if not r.load_state().get("done"):
            continue
        for row, method, ev, _ in (x for x in report_rows(spec) if x[1] == r.method):
            entry = results[r.split].setdefault(row, {"seeds": [], "test": [], "val_dice": [], "images": {},
                                                      "train_minutes": [], "eps": []})
            entry["seeds"].append(r.seed)
            entry["test"].append(read_metrics(eval_folder(r, "test", ev)))
            if validation:
                entry["val_dice"].append(read_metrics(eval_folder(r, "validation", ev))["dice"])
            entry["train_minutes"].append(r.state["train_seconds"] / 60)
            if "eps" in r.state:
                entry["eps"].append(r.state["eps"])
            for image, dice in per_image_dice(eval_folder(r, "test", ev)).items():
                entry["images"].setdefault(image, []).append(dice)
    return results


def seed_mean_dice(entry: dict) -> dict[str, float]:
    return {image: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")
            for image, v in entry["images"].items()}


def wilcoxon_vs(entry: dict, base: dict) -> tuple[float, float]:
    """(median paired difference, two-sided Wilcoxon signed-rank p) of per-image, seed-averaged Dice."""
    from scipy.stats import wilcoxon

    a, b = seed_mean_dice(entry), seed_mean_dice(base)
    pairs = np.array([(a[i], b[i]) for i in a if i in b and np.isfinite(a[i]) and np.isfinite(b[i])])
    if len(pairs) == 0:
        return float("nan"), float("nan")
    diff = pairs[:, 0] - pairs[:, 1]
    if np.all(diff == 0):
        return 0.0, 1.0
    return float(np.median(diff)), float(wilcoxon(pairs[:, 0], pairs[:, 1]).pvalue)


def table_rows(spec: dict, results: dict) -> list[dict]:
    rows = []
    selects = spec.get("select") or {}
    for split, entries in results.items():
        names = [(row, row, label, ev) for row, _, ev, label in report_rows(spec) if row in entries]
        for sel_name, sel in selects.items():
            candidates = [m for m in sel["from"] if m in entries]
            if candidates:
                best = max(candidates, key=lambda m: statistics.fmean(entries[m]["val_dice"]))
                label = f"{sel.get('label', sel_name)}: {spec['methods'][best].get('label', best)}"
                names.append((sel_name, best, label, ""))
        for name, row_name, label, ev in names:
            entry = entries[row_name]
            # the baseline under the same evaluation, or (a method scored otherwise, e.g. a refiner) under its first
            baseline = spec["methods"].get(row_name.split("+")[0], {}).get("baseline", spec["baseline"])
            base = entries.get(f"{baseline}+{ev}" if ev else baseline) or next(
                (entries[r] for r, m, _, _ in report_rows(spec) if m == baseline and r in entries), None)
            row = {"split": split, "method": name, "label": label, "seeds": len(entry["seeds"])}
            for metric in spec.get("metrics", METRICS):
                values = [t[metric] for t in entry["test"]]
                row[f"{metric}_mean"] = statistics.fmean(values)
                row[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else 0.0
            row["val_dice_mean"] = statistics.fmean(entry["val_dice"]) if entry["val_dice"] else ""
            row["train_minutes"] = statistics.fmean(entry["train_minutes"])
            row["eps"] = statistics.fmean(entry["eps"]) if entry["eps"] else ""
            if base is not None and base is not entry:
                row["median_dice_diff"], row["wilcoxon_p"] = wilcoxon_vs(entry, base)
            else:
                row["median_dice_diff"], row["wilcoxon_p"] = "", ""
            rows.append(row)
    return rows


def baseline_label(spec: dict) -> str:
    """The baseline column's name: the study's baseline, or "baseline" where methods name their own."""
    own = any("baseline" in m for m in spec["methods"].values())
    return "its baseline" if own else spec["baseline"]


def write_tables(rows: list[dict], spec: dict, report: Path) -> None:
    report.mkdir(parents=True, exist_ok=True)
    with open(report / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    metrics = spec.get("metrics", METRICS)
    lower = set(spec.get("lower", []))
    validation = "validation" in eval_splits(spec)
    heads = [METRIC_LABELS.get(m, m) + (" ↓" if m in lower else "") for m in metrics]
    heads += ["val Dice"] * validation + [f"Δ median Dice vs {baseline_label(spec)}", "Wilcoxon p", "train min"]
    lines = []
    for split in spec["splits"]:
        lines += [f"### {split} split", "", "| method | seeds | " + " | ".join(heads) + " |",
                  "|---" * (len(heads) + 2) + "|"]
        for row in (r for r in rows if r["split"] == split):
            # counts (components, holes) and their ratios run into the hundreds: 4 decimals only below 10
            cells = [f"{row[f'{m}_mean']:.{4 if abs(row[f'{m}_mean']) < 10 else 1}f} ± "
                     f"{row[f'{m}_std']:.{4 if abs(row[f'{m}_mean']) < 10 else 1}f}" for m in metrics]
            if validation:
                cells.append(f"{row['val_dice_mean']:.4f}")
            cells.append("" if row["median_dice_diff"] == "" else f"{row['median_dice_diff']:+.4f}")
            cells.append("" if row["wilcoxon_p"] == "" else f"{row['wilcoxon_p']:.3g}")
            lines.append(f"| {row['label']} | {row['seeds']} | {' | '.join(cells)} | {row['train_minutes']:.1f} |")
        lines.append("")
    (report / "results_tables.md").write_text("\n".join(lines))


def plot(spec: dict, results: dict, runs: list[Run], report: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for split, entries in results.items():
        names = [row for row, *_ in report_rows(spec) if row in entries]
        if not names:
            continue
        fig = Figure(figsize=(max(6.0, 0.9 * len(names)), 4.5), layout="constrained")
        ax = fig.add_subplot()
        data = [[v for v in seed_mean_dice(entries[m]).values() if np.isfinite(v)] for m in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha="right")
        ax.set_ylabel("test Dice per image (mean over seeds)")
        ax.set_title(f"{spec.get('title', 'Kvasir-SEG')}, {split} split")
        FigureCanvasAgg(fig)
        written.append(report / f"dice_boxplot_{split}.png")
        fig.savefig(written[-1], dpi=110)
        if spec.get("figure"):
            first_seed = [r for r in runs if r.split == split and r.seed == spec["seeds"][0]]
            written += plot_test_image(spec, split, first_seed, report / f"test_image_{split}.png")

        adaptive = [r for r in runs if r.split == split and r.seed == spec["seeds"][0]
                    and (r.folder / "train" / "difficulty_history.csv").exists() and r.state.get("done")]
        if not adaptive:
            continue
        fig = Figure(figsize=(4.0 * len(adaptive), 3.6), layout="constrained")
        for i, r in enumerate(adaptive):
            with open(r.folder / "train" / "difficulty_history.csv", newline="") as f:
                hist = list(csv.DictReader(f))
            epochs = sorted({int(h["epoch"]) for h in hist})
            ax = fig.add_subplot(1, len(adaptive), i + 1)
            ax.boxplot([[float(h["eps"]) for h in hist if int(h["epoch"]) == e] for e in epochs])
            ax.set_xticks(range(1, len(epochs) + 1), [str(e) for e in epochs])
            ax.set_xlabel("epoch of the pass")
            ax.set_ylabel("ε per image" if i == 0 else "")
            ax.set_title(spec["methods"][r.method].get("label", r.method), fontsize=9)
        fig.suptitle(f"ε over training, {split} split, seed {spec['seeds'][0]}")
        FigureCanvasAgg(fig)
        written.append(report / f"eps_over_training_{split}.png")
        fig.savefig(written[-1], dpi=110)
    return written


def plot_test_image(spec: dict, split: str, runs: list[Run], out_png: Path) -> list[Path]:
    """The ``figure`` image's ground truth (crop), then one panel per report row (or per row of its ``rows``): its
    topology overlay from the first seed's run, titled with the row's label and that image's Dice, clDice and Betti-0
    error."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    image, (x, y, w, h) = spec["figure"]["image"], spec["figure"]["crop"]
    order = spec["figure"].get("rows") or [row for row, *_ in report_rows(spec)]
    panels = []
    for r in runs:
        for row, method, ev, label in report_rows(spec):
            overlay = eval_folder(r, "test", ev) / "overlays" / f"{image}_topology.png"
            if method == r.method and row in order and overlay.is_file():
                scores = {m: per_image(eval_folder(r, "test", ev), m).get(image, float("nan"))
                          for m in ("dice", "cldice", "betti0_error")}
                panels.append((row, label, np.asarray(Image.open(overlay))[y: y + h, x: x + w], scores))
    if not panels:
        return []
    panels.sort(key=lambda p: order.index(p[0]))
    datalist = BUNDLE_ROOT / spec["splits"][split] / "datalist.json"
    items = json.loads(datalist.read_text())["test"] if datalist.is_file() else []
    truth_file = next((datalist.parent / i["label"] for i in items if Path(i["image"]).name.split(".")[0] == image),
                      None)
    if truth_file is not None:
        truth = (np.asarray(Image.open(truth_file).convert("L"))[y: y + h, x: x + w] > 127).astype(np.uint8) * 255
        panels.insert(0, ("", "ground truth", truth, None))
    cols = 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.2 * cols, 4.2 * h / w * rows + 0.4 * rows), layout="constrained")
    for i, (_, label, crop, scores) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(crop, interpolation="nearest", cmap="gray")
        ax.set_axis_off()
        ax.set_title(label if scores is None else f"{label}\nDice {scores['dice']:.3f}, clDice {scores['cldice']:.3f}, "
                     f"Betti-0 error {scores['betti0_error']:.0f}", fontsize=8)
    fig.suptitle(f"{image} (seed {spec['seeds'][0]}), pixels x {x}–{x + w}, y {y}–{y + h}", fontsize=9)
    sys.path.insert(0, str(BUNDLE_ROOT))  # the bundle's colours
    from matplotlib.patches import Patch
    from scripts.figures import TOPOLOGY_COLOURS

    names = {"vessel": "predicted vessel", "false_positive": "predicted, not in the label", "missed": "missed vessel",
             "break": "break (ringed)", "fragment": "fragment (ringed)"}
    handles = [Patch(facecolor=np.array(c) / 255, edgecolor="0.4", label=names[k]) for k, c in TOPOLOGY_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=110)
    return [out_png]


def per_image(folder: Path, metric: str) -> dict[str, float]:
    """{image stem: value} of one metric of an evaluation (MetricsSaver's ``test_<metric>_raw.csv``)."""
    with open(folder / f"test_{metric}_raw.csv", newline="") as f:
        return {Path(r["filename"]).name.split(".")[0]: float(r["mean"]) for r in csv.DictReader(f)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path, help="the study file (YAML)")
    p.add_argument("--output", type=Path, default=BUNDLE_ROOT / "runs" / "study", help="where the runs go")
    p.add_argument("--report", type=Path, help="where results.csv, results_tables.md and plots go (default: --output)")
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training")
    p.add_argument("--report-only", action="store_true", help="only write the report from the finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the training command of each run and stop")
    args = p.parse_args()
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be >= 1")
    spec = load_study(args.study)
    output = args.output.resolve()
    runs = make_runs(spec, output)
    if args.dry_run:
        for r in runs:
            extra = {"output_dir": str(r.folder / "train"), **chained_overrides(r, spec, output, None)}
            print(r.name, "\n   ", " ".join(bundle_command(r, spec, "training",
                                                           spec["methods"][r.method].get("configs", []), extra)))
        return 0
    failed = [] if args.report_only else run_study(spec, runs, output, args.jobs, args.threads)
    report = (args.report or output).resolve()
    results = collect(spec, runs)
    if any(results.values()):
        rows = table_rows(spec, results)
        write_tables(rows, spec, report)
        figures = plot(spec, results, runs, report)
        print(f"report: {report / 'results.csv'}, {report / 'results_tables.md'}, "
              + ", ".join(f.name for f in figures))
        print((report / "results_tables.md").read_text())
    if failed:
        print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}; run the same command again to retry them")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
