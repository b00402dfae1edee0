# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The difficulty-signal study of docs/results_difficulty.md: does the difficulty pass's D rank images by how hard
they are, and which signal, dropout and sample count should the bundle use?

    # a prepared split whose training list has labels broken on purpose (erased, shifted, swapped)
    python benchmarks/difficulty.py corrupt data/kvasir_thesis data/kvasir_thesis_audit0 --seed 0 \
        --erased 6 --shifted 10 --swapped 10
    # the signals of a study's trained runs (benchmarks/study.py), on their training and test images: the error of
    # the deterministic prediction and every signal from two independent passes of N samples (signals/*.npz)
    python benchmarks/difficulty.py signals benchmarks/study_difficulty_cpu.yaml --output runs/study_difficulty \
        --samples 20
    # the label audit's evidence at each saved epoch of runs trained on broken labels (audit/epoch*.npz)
    python benchmarks/difficulty.py audit benchmarks/study_audit_cpu.yaml --output runs/study_audit --samples 8
    # the tables (Spearman with bootstrap intervals, Kendall tau, audit rankings) and figures
    python benchmarks/difficulty.py report --variants benchmarks/study_difficulty_cpu.yaml runs/study_difficulty \
        --audit benchmarks/study_audit_cpu.yaml runs/study_audit --report docs/results/difficulty

Run with OMP_NUM_THREADS=1 beside other work on a small CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

KINDS = ("erased", "shifted", "swapped")
NUM_SAMPLES = (2, 4, 10, 20)   # issue 24 §3
BAND_WIDTH = 2                 # of the boundary band, in pixels of the network's input
NUM_MAP_IMAGES = 4             # test images whose maps each run keeps, the same for every run of a split


def signal_scorers() -> dict:
    """The signals compared, each a function of (N, B, H, W) samples and the (B, H, W) label: name -> scorer."""
    from scripts.difficulty import DiceErrorDifficulty, UncertaintyDifficulty

    return {
        "mi_label": UncertaintyDifficulty("mutual_information", "label"),   # the thesis's D
        "mi_prediction": UncertaintyDifficulty("mutual_information", "prediction"),
        "entropy_prediction": UncertaintyDifficulty("entropy", "prediction"),
        "mi_boundary": UncertaintyDifficulty("mutual_information", "boundary", band_width=BAND_WIDTH),
        "dice_error_mean": DiceErrorDifficulty(),   # 1 - Dice of the mean prediction, the control of method.md §7
    }


def study_runs(study_file: Path, output: Path, methods: list[str] | None = None) -> list[dict]:
    """The finished runs of a study (benchmarks/study.py): split, method, seed, folder, overlays and overrides."""
    spec = yaml.safe_load(study_file.read_text())
    runs = []
    for split, folder in spec["splits"].items():
        for method, m in spec["methods"].items():
            if methods and method not in methods:
                continue
            for seed in spec["seeds"]:
                run = output / split / method / f"seed{seed}"
                if (run / "models" / "model.pt").is_file():
                    overrides = {**spec["budget"], **m.get("overrides", {}), "seed": seed,
                                 "dataset_dir": str((BUNDLE_ROOT / folder).resolve()), "ckpt_dir": str(run / "models")}
                    runs.append({"split": split, "method": method, "seed": seed, "folder": run,
                                 "configs": m.get("configs", []), "overrides": overrides})
    return runs


def bundle_parts(run: dict):
    """The run's network (untrained), its deterministic preprocessing and its training and test lists, parsed from
    the bundle's own configs with the run's overlays and overrides."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / c) for c in ["configs/train.yaml", *run["configs"]]])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    for key, value in run["overrides"].items():
        parser[key] = value
    from scripts.data import load_datalist

    datalist, dataset_dir = parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir")
    return (parser.get_parsed_content("network_def"), parser.get_parsed_content("validate#preprocessing"),
            {key: load_datalist(datalist, key, dataset_dir) for key in ("training", "test")})


def load_weights(network: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``network`` with the weights of ``path`` (``model.pt``, or the ``model`` of a training checkpoint), in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    return network.eval()


def measure(network, transform, items: list[dict], num_samples: int, batch_size: int, seed: int,
            map_indices: list[int] = ()) -> dict:
    """
    For every image of ``items``: the error of the deterministic prediction (1 - Dice of its argmax against the
    label, inside the field of view where the data has one) and each signal of :func:`signal_scorers` from two
    independent sets of ``num_samples`` dropout samples (halves A and B), for each N of :data:`NUM_SAMPLES` up to
    ``num_samples`` (the first N of each half). Also the seconds spent sampling and on each signal, and the maps
    of the images at ``map_indices``.
    """
    import monai
    from scripts.difficulty import dice_error
    from scripts.uncertainty import mc_foreground_samples, uncertainty_maps

    scorers = signal_scorers()
    sizes = [n for n in NUM_SAMPLES if n <= num_samples]
    signals = {name: np.zeros((2, len(sizes), len(items))) for name in scorers}
    error = np.zeros(len(items))
    seconds = {"sampling": 0.0, "deterministic": 0.0, **{name: 0.0 for name in scorers}}
    maps, start = {}, 0
    loader = monai.data.DataLoader(monai.data.Dataset(items, transform), batch_size=batch_size, num_workers=0)
    torch.manual_seed(seed)
    for batch in loader:
        images, labels = batch["image"].as_tensor(), batch["label"].as_tensor()[:, 0]
        fov = batch["fov"].as_tensor()[:, 0] if "fov" in batch else torch.ones_like(labels)
        end = start + len(images)
        began = time.perf_counter()
        with torch.inference_mode():
            prob = torch.softmax(network(images), 1)[:, 1]
        error[start:end] = dice_error(prob * fov, labels * fov).numpy()
        seconds["deterministic"] += time.perf_counter() - began
        began = time.perf_counter()
        samples = mc_foreground_samples(network, images, 2 * num_samples, chunk_size=8)
        seconds["sampling"] += time.perf_counter() - began
        for h in range(2):
            half = samples[h * num_samples:(h + 1) * num_samples]
            for i, n in enumerate(sizes):
                for name, scorer in scorers.items():
                    began = time.perf_counter()
                    signals[name][h, i, start:end] = scorer(half[:n], labels).double().numpy()
                    if h == 0 and n == num_samples:
                        seconds[name] += time.perf_counter() - began
        for j in [k for k in map_indices if start <= k < end]:
            m = uncertainty_maps(samples[:num_samples, j - start])
            maps.setdefault("image", []).append(images[j - start].numpy())
            maps.setdefault("label", []).append(labels[j - start].numpy())
            maps.setdefault("prob", []).append(prob[j - start].numpy())
            for key in ("mean", "mutual_information", "entropy"):
                maps.setdefault(key, []).append(m[key].numpy())
        start = end
    return {"error": error, "signals": signals, "sizes": sizes, "seconds": seconds,
            "maps": {k: np.stack(v) for k, v in maps.items()}}


def save_measurement(path: Path, result: dict, ids: list[str]) -> None:
    from scripts.files import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"signal/{k}": v for k, v in result["signals"].items()}
    arrays.update({f"map/{k}": v for k, v in result["maps"].items()})
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, ids=np.array(ids), error=result["error"], sizes=np.array(result["sizes"]),
                            seconds=json.dumps(result["seconds"]), **arrays)


def _write(path: Path, text: str) -> None:
    """``text`` into ``path``, whole or not at all."""
    from scripts.files import atomic_write

    with atomic_write(path) as f:
        f.write(text)


def signals_command(args) -> None:
    runs = study_runs(args.study, args.output, args.methods)
    print(f"{len(runs)} finished runs of {args.study}", flush=True)
    for run in runs:
        target = run["folder"] / "signals"
        if (target / "test.npz").is_file() and not args.force:
            continue
        began = time.perf_counter()
        network, transform, lists = bundle_parts(run)
        load_weights(network, run["folder"] / "models" / "model.pt")
        for key, items in lists.items():
            fixed = sorted(np.random.default_rng(0).permutation(len(items))[:NUM_MAP_IMAGES].tolist())
            result = measure(network, transform, items, args.samples, args.batch_size, seed=run["seed"],
                             map_indices=fixed if key == "test" else ())
            save_measurement(target / f"{key}.npz", result, [str(i["image"]) for i in items])
        print(f"  {run['split']}/{run['method']}/seed{run['seed']}: {time.perf_counter() - began:.0f} s", flush=True)


def checkpoints(models: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of a run's ``checkpoint_epoch=K.pt`` files, in epoch order."""
    found = [(int(p.stem.split("=")[1]), p) for p in models.glob("checkpoint_epoch=*.pt")]
    return sorted(found)


def audit_command(args) -> None:
    """For each run trained on broken labels and each of its saved epochs in ``--epochs``: the audit's evidence
    for every training image (``audit_epoch<K>.npz``: the signals of :func:`measure` and the error, against the
    labels the run trained on)."""
    runs = study_runs(args.study, args.output)
    for run in runs:
        network, transform, lists = bundle_parts(run)
        for epoch, path in checkpoints(run["folder"] / "models"):
            if args.epochs and epoch not in args.epochs:
                continue
            target = run["folder"] / "audit" / f"epoch{epoch:03d}.npz"
            if target.is_file() and not args.force:
                continue
            began = time.perf_counter()
            load_weights(network, path)
            result = measure(network, transform, lists["training"], args.samples, args.batch_size, seed=run["seed"])
            save_measurement(target, result, [str(i["label"]) for i in lists["training"]])
            print(f"  {run['split']}/{run['method']}/seed{run['seed']} epoch {epoch}: "
                  f"{time.perf_counter() - began:.0f} s", flush=True)


def _read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L")) > 127


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two binary masks of one shape."""
    return 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def corrupt_labels(labels: list[Path], counts: dict[str, int], seed: int | np.random.Generator = 0,
                   max_overlap: float = 0.3) -> tuple[dict[Path, np.ndarray], dict[str, list[Path]]]:
    """
    Broken versions of ``counts[kind]`` of ``labels`` (mask files), for each kind of :data:`KINDS`:

    - erased: all background;
    - shifted: the true mask rolled by a third of the frame's height and width;
    - swapped: two images exchange their masks (each resized to the other's frame), so its count must be even.

    A shifted or swapped mask whose Dice with the true one exceeds ``max_overlap`` would be barely wrong, so such
    candidates are passed over. ``seed`` may be a generator that has drawn before (``numpy.random.default_rng``
    takes either). Returns the new masks by label path and the broken labels by kind.
    """
    if counts.get("swapped", 0) % 2:
        raise ValueError(f"swaps come in pairs: got swapped={counts['swapped']}.")
    rng = np.random.default_rng(seed)
    candidates = iter([labels[i] for i in rng.permutation(len(labels))])
    new: dict[Path, np.ndarray] = {}
    broken: dict[str, list[Path]] = {kind: [] for kind in KINDS}
    while len(broken["erased"]) < counts.get("erased", 0):
        path = next(candidates)
        new[path] = np.zeros_like(_read_mask(path))
        broken["erased"].append(path)
    while len(broken["shifted"]) < counts.get("shifted", 0):
        path = next(candidates)
        true = _read_mask(path)
        shifted = np.roll(true, (true.shape[0] // 3, true.shape[1] // 3), axis=(0, 1))
        if _overlap(shifted, true) <= max_overlap:
            new[path] = shifted
            broken["shifted"].append(path)
    while len(broken["swapped"]) < counts.get("swapped", 0):
        a, b = next(candidates), next(candidates)
        true_a, true_b = _read_mask(a), _read_mask(b)
        as_a = np.asarray(Image.fromarray(true_b).resize(true_a.shape[::-1], Image.NEAREST))
        as_b = np.asarray(Image.fromarray(true_a).resize(true_b.shape[::-1], Image.NEAREST))
        if max(_overlap(as_a, true_a), _overlap(as_b, true_b)) <= max_overlap:
            new[a], new[b] = as_a, as_b
            broken["swapped"] += [a, b]
    return new, broken


def corrupt(source: Path, output: Path, counts: dict[str, int], seed: int) -> dict[str, list[str]]:
    """
    A copy of the prepared split ``source`` (its ``datalist.json``) in ``output`` whose training list points at
    broken masks (:func:`corrupt_labels`, written as 0/255 PNGs in ``output/masks``) for the drawn images;
    validation and test lists, and every other file, are the originals. Writes ``output/broken.json``.
    """
    datalist = json.loads((source / "datalist.json").read_text())
    output.mkdir(parents=True, exist_ok=True)
    (output / "masks").mkdir(exist_ok=True)
    resolve = lambda p: (source / p).resolve()  # noqa: E731
    relative = lambda p: os.path.relpath(p, output)  # noqa: E731
    labels = [resolve(item["label"]) for item in datalist["training"]]
    new, broken = corrupt_labels(labels, counts, seed)
    written = {}
    for path, mask in new.items():
        target = output / "masks" / f"{path.stem}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(target)
        written[path] = target
    for split, items in datalist.items():
        if not isinstance(items, list):
            continue
        for item in items:
            for key, value in item.items():
                if isinstance(value, str):
                    path = resolve(value)
                    item[key] = relative(written.get(path, path) if split == "training" else path)
    _write(output / "datalist.json", json.dumps(datalist, indent=2) + "\n")
    result = {kind: [relative(written[p]) for p in paths] for kind, paths in broken.items()}
    _write(output / "broken.json", json.dumps(result, indent=2) + "\n")
    return result


SIGNAL_LABELS = {
    "mi_label": "D: MI over the label's foreground (thesis)",
    "mi_prediction": "MI over the predicted foreground",
    "entropy_prediction": "entropy over the predicted foreground",
    "mi_boundary": f"MI in a {BAND_WIDTH}-px band around the label's boundary",
    "dice_error_mean": "1 − Dice of the mean prediction (control)",
}
SHORT = {"mi_label": "D (MI, label)", "mi_prediction": "MI, prediction", "entropy_prediction": "entropy, prediction",
         "mi_boundary": "MI, boundary band", "dice_error_mean": "1 − Dice of the mean"}
NEEDS_LABEL = {"mi_label": True, "mi_prediction": False, "entropy_prediction": False, "mi_boundary": True,
               "dice_error_mean": True}


def load_measurement(path: Path) -> dict:
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    out["seconds"] = json.loads(str(out["seconds"]))
    out["signals"] = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("signal/")}
    out["maps"] = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("map/")}
    return out


def _row_ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def spearman_over_seeds(signals: list[np.ndarray], errors: list[np.ndarray], resamples: int = 2000,
                        seed: int = 0) -> tuple[float, float, float]:
    """
    The Spearman correlation of signal and error, averaged over the seeds' models (each on the same images), with
    a 95 % percentile bootstrap interval: the images are drawn with replacement (one draw for all seeds, the image
    being the unit) and the seeds' correlations averaged in each draw. Returns (ρ, low, high).
    """
    point = float(np.mean([_row_pearson(_row_ranks(x), _row_ranks(y)) for x, y in zip(signals, errors)]))
    m = len(errors[0])
    index = np.random.default_rng(seed).integers(0, m, (resamples, m))
    boot = np.mean([_row_pearson(_row_ranks(x[index]), _row_ranks(y[index])) for x, y in zip(signals, errors)], 0)
    low, high = np.nanpercentile(boot, [2.5, 97.5])
    return point, float(low), float(high)


def _fmt_ci(rho: float, low: float, high: float) -> str:
    return f"{rho:+.2f} [{low:+.2f}, {high:+.2f}]"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _metric_mean(folder: Path, split: str) -> float | None:
    """Mean Dice of a run's evaluation on ``split`` (MetricsSaver's metrics.csv), None if not evaluated."""
    path = folder / split / "metrics.csv"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        name, _, value = line.partition(",")
        if name.strip() == f"{split}_dice":
            return float(value)
    return None


def signal_tables(groups: dict[str, list[Path]], title: str) -> tuple[str, list[dict]]:
    """Q1 and Q3 for one model family (``groups``: list name -> the seeds' run folders): per signal and list, the
    Spearman correlation with the error at the largest N, and per N the correlation of D and its rank stability."""
    from scipy.stats import kendalltau

    rows, records, cost = [], [], {}
    data = {key: [load_measurement(f / "signals" / f"{key}.npz") for f in folders] for key, folders in groups.items()}
    for name in SIGNAL_LABELS:
        cells = []
        for key, ms in data.items():
            rho = spearman_over_seeds([m["signals"][name][0, -1] for m in ms], [m["error"] for m in ms])
            cells.append(_fmt_ci(*rho))
            records.append({"family": title, "list": key, "signal": name, "N": int(ms[0]["sizes"][-1]),
                            "rho": rho[0], "low": rho[1], "high": rho[2]})
        seconds = [m["seconds"][name] / len(m["error"]) for ms in data.values() for m in ms]
        sampling = [m["seconds"]["sampling"] / len(m["error"]) / (2 * m["sizes"][-1]) for ms in data.values()
                    for m in ms]
        cost[name] = (1e3 * float(np.mean(seconds)), 1e3 * float(np.mean(sampling)))
        rows.append([SIGNAL_LABELS[name], *cells, "yes" if NEEDS_LABEL[name] else "no", f"{cost[name][0]:.2f}"])
    some = next(iter(data.values()))[0]
    n = int(some["sizes"][-1])
    text = (f"**{title}** (N = {n}; ρ averaged over {len(next(iter(groups.values())))} seeds, 95 % bootstrap "
            f"interval over images; sampling cost {cost['mi_label'][1]:.2f} ms per image and sample)\n\n")
    text += _markdown(["signal", *[f"ρ with error, {k} images" for k in data], "needs the label",
                       "ms per image beyond sampling"], rows)
    # Q3: N
    rows = []
    for name in ("mi_label", "mi_prediction", "entropy_prediction"):
        for i, size in enumerate(some["sizes"]):
            cells = []
            for key, ms in data.items():
                rho = spearman_over_seeds([m["signals"][name][0, i] for m in ms], [m["error"] for m in ms])
                tau = float(np.mean([kendalltau(m["signals"][name][0, i], m["signals"][name][1, i]).statistic
                                     for m in ms]))
                cells += [_fmt_ci(*rho), f"{tau:.2f}"]
                records.append({"family": title, "list": key, "signal": name, "N": int(size), "rho": rho[0],
                                "low": rho[1], "high": rho[2], "kendall_tau": tau})
            rows.append([SHORT[name], str(size), *cells])
    text += "\n" + _markdown(["signal", "N", *[c for k in data for c in (f"ρ with error, {k}",
                                                                          f"Kendall τ between two passes, {k}")]],
                              rows)
    return text, records


def _split(spec: dict) -> str:
    return next(iter(spec["splits"]))


def variant_table(study_output: Path, spec: dict, size: int = 10) -> tuple[str, list[dict]]:
    """Q2: per dropout variant, at N = ``size``: the correlation with the error of D and of the entropy over the
    predicted foreground, their rank stability between two passes, the spread of D over a pass (training images)
    and the deterministic model's validation and test Dice, mean over seeds."""
    from scipy.stats import kendalltau

    rows, records = [], []
    for method, m in spec["methods"].items():
        folders = sorted(p for p in (study_output / _split(spec) / method).glob("seed*")
                         if (p / "signals" / "test.npz").is_file())
        if not folders:
            continue
        train = [load_measurement(f / "signals" / "training.npz") for f in folders]
        test = [load_measurement(f / "signals" / "test.npz") for f in folders]
        i = list(train[0]["sizes"]).index(min(size, int(train[0]["sizes"][-1])))
        record = {"method": method, "seeds": len(folders)}
        cells = []
        for name in ("mi_label", "entropy_prediction"):
            for key, ms in (("training", train), ("test", test)):
                rho = spearman_over_seeds([t["signals"][name][0, i] for t in ms], [t["error"] for t in ms])
                cells.append(_fmt_ci(*rho))
                record[f"rho_{name}_{key}"] = rho[0]
            tau = float(np.mean([kendalltau(t["signals"][name][0, i], t["signals"][name][1, i]).statistic
                                 for t in train]))
            cells.append(f"{tau:.2f}")
            record[f"tau_{name}"] = tau
        d = [t["signals"]["mi_label"][0, i] for t in train]
        record["p90_p10"] = float(np.mean([np.percentile(x, 90) / max(np.percentile(x, 10), 1e-12) for x in d]))
        record["cv"] = float(np.mean([np.std(x) / np.mean(x) for x in d]))
        val = [_metric_mean(f, "validation") for f in folders]
        tst = [_metric_mean(f, "test") for f in folders]
        mean_std = lambda v: (f"{np.mean(v):.3f} ± {np.std(v):.3f}" if all(x is not None for x in v)  # noqa: E731
                              else "–")
        record["val_dice"] = float(np.mean(val)) if None not in val else None
        record["test_dice"] = float(np.mean(tst)) if None not in tst else None
        rows.append([m.get("label", method), str(len(folders)), *cells, f"{record['p90_p10']:.2f}",
                     f"{record['cv']:.2f}", mean_std(val), mean_std(tst)])
        records.append(record)
    header = ["dropout", "seeds", "ρ(D, error), training", "ρ(D, error), test", "τ of D",
              "ρ(entropy, error), training", "ρ(entropy, error), test", "τ of entropy", "D p90/p10", "D CV",
              "validation Dice", "test Dice"]
    return (f"At N = {size}; D: MI over the label's foreground; entropy: over the predicted foreground; τ: Kendall "
            "τ between two independent passes of the training images; the spread of D over one pass of the "
            "training images.\n\n" + _markdown(header, rows)), records


def map_figure(study_output: Path, spec: dict, target: Path) -> Path:
    """The same test images' MI maps under each dropout variant (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = _split(spec)
    methods = [m for m in spec["methods"] if (study_output / split / m / "seed0" / "signals" / "test.npz").is_file()]
    first = load_measurement(study_output / split / methods[0] / "seed0" / "signals" / "test.npz")["maps"]
    n = len(first["image"])
    fig, axes = plt.subplots(n, 2 + len(methods), figsize=(1.9 * (2 + len(methods)), 2.0 * n), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(np.clip(np.moveaxis(first["image"][r], 0, -1), 0, 1).swapaxes(0, 1))
        axes[r, 1].imshow(first["label"][r].T, cmap="gray")
        for c, method in enumerate(methods):
            maps = load_measurement(study_output / split / method / "seed0" / "signals" / "test.npz")["maps"]
            mi = maps["mutual_information"][r]
            axes[r, 2 + c].imshow(mi.T, cmap="magma", vmin=0, vmax=max(float(mi.max()), 1e-6))
            axes[r, 2 + c].contour(maps["label"][r].T, levels=[0.5], colors="cyan", linewidths=0.6)
            if r == 0:
                axes[r, 2 + c].set_title(spec["methods"][method]["label"].replace(", ", ",\n"), fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    axes[0, 1].set_title("label", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Mutual information of 20 dropout samples (each panel scaled to its own maximum; cyan: label)",
                 fontsize=8)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=80)
    plt.close(fig)
    return target


def scatter_figure(groups: dict[str, list[Path]], target: Path, title: str) -> Path:
    """Each training image's D, and 1 − Dice of the mean prediction, against its error (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = load_measurement(groups["training"][0] / "signals" / "training.npz")
    names = ["mi_label", "entropy_prediction", "dice_error_mean"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4))
    for ax, name in zip(axes, names):
        ax.scatter(m["signals"][name][0, -1], m["error"], s=4, alpha=0.5)
        ax.locator_params(axis="x", nbins=4)  # D's narrow range would crowd the tick labels
        ax.set_xlabel(SIGNAL_LABELS[name], fontsize=8)
        ax.set_ylabel("error: 1 − Dice of the deterministic prediction", fontsize=8)
    fig.suptitle(f"{title}: training images, seed 0", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


AUDIT_RANKINGS = {
    "1 − Dice, deterministic prediction": lambda e: e["error"],
    "1 − Dice, mean prediction": lambda e: e["dice_error_mean"],
    "(1 − Dice)·(1 − q_D) (today)": lambda e: e["dice_error_mean"] * (1 - _quantile(e["mi_label"])),
    "(1 − Dice)·(1 − q_H), H: entropy over the prediction": lambda e: e["dice_error_mean"] * (
        1 - _quantile(e["entropy_prediction"])),
    "(1 − Dice)·(1 − q_MI), MI over the prediction": lambda e: e["dice_error_mean"] * (
        1 - _quantile(e["mi_prediction"])),
}


def _quantile(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return (rankdata(x) - 1.0) / max(len(x) - 1, 1)


def audit_table(audit_output: Path, spec: dict, top_fraction: float = 0.1) -> tuple[str, list[dict]]:
    """Q4: per ranking and training length, how many broken labels of each kind land in the top 10 % and the
    average precision of finding the broken labels, over the corruption draws."""
    per = {}
    for split, folder in spec["splits"].items():
        dataset = (BUNDLE_ROOT / folder).resolve()
        broken = json.loads((dataset / "broken.json").read_text())
        kind_of = {str((dataset / p).resolve()): kind for kind, paths in broken.items() for p in paths}
        for path in sorted((audit_output / split).glob("*/seed*/audit/epoch*.npz")):
            epoch = int(path.stem[5:])
            m = load_measurement(path)
            evidence = {"error": m["error"], **{k: v[0, -1] for k, v in m["signals"].items()}}
            kinds = np.array([kind_of.get(str(Path(i).resolve()), "") for i in m["ids"]])
            k = int(round(top_fraction * len(kinds)))
            for name, ranking in AUDIT_RANKINGS.items():
                score = ranking(evidence)
                order = np.argsort(-score, kind="stable")
                hit = kinds[order] != ""
                precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
                ap = float((precision * hit).sum() / hit.sum())
                top = kinds[order[:k]]
                per.setdefault((name, epoch), []).append({"ap": ap, **{kind: int((top == kind).sum()) for kind in KINDS},
                                                          "k": k, "n": {kd: int((kinds == kd).sum()) for kd in KINDS}})
    rows, records = [], []
    for (name, epoch), draws in sorted(per.items(), key=lambda x: (x[0][1], list(AUDIT_RANKINGS).index(x[0][0]))):
        n = draws[0]["n"]
        found = {kind: np.mean([d[kind] for d in draws]) for kind in KINDS}
        total = sum(found.values())
        ap = [d["ap"] for d in draws]
        rows.append([str(epoch), name, *[f"{found[kd]:.1f} / {n[kd]}" for kd in KINDS],
                     f"{total:.1f} / {sum(n.values())}", f"{np.mean(ap):.3f} ± {np.std(ap):.3f}"])
        records.append({"epoch": epoch, "ranking": name, **{kd: found[kd] for kd in KINDS}, "total": total,
                        "ap": float(np.mean(ap)), "draws": len(draws)})
    k = draws[0]["k"]
    header = ["epoch", "ranking", *[f"{kd} in top {k}" for kd in KINDS], f"all in top {k}", "average precision"]
    return _markdown(header, rows), records


def report_command(args) -> None:
    out = args.report
    out.mkdir(parents=True, exist_ok=True)
    text, records = "", {}
    if args.variants:
        spec = yaml.safe_load(args.variants[0].read_text())
        output = args.variants[1]
        base = next(iter(spec["methods"]))
        folders = sorted(p for p in (output / _split(spec) / base).glob("seed*")
                         if (p / "signals" / "test.npz").is_file())
        groups = {"training": folders, "test": folders}
        title = spec.get("title", "Kvasir-SEG")
        t, r = signal_tables(groups, f"{title}, {_split(spec)} split, {spec['methods'][base]['label']}")
        text += f"## Signals, {title}\n\n" + t
        records["signals_kvasir"] = r
        t, r = variant_table(output, spec)
        text += f"\n## Dropout variants, {title}\n\n" + t
        records["variants"] = r
        for method in spec["methods"]:
            if method == base:
                continue
            fs = sorted(p for p in (output / _split(spec) / method).glob("seed*")
                        if (p / "signals" / "test.npz").is_file())
            if fs:
                t, r = signal_tables({"training": fs, "test": fs}, f"{title}, {spec['methods'][method]['label']}")
                text += "\n" + t
                records.setdefault("signals_variants", []).extend(r)
        map_figure(output, spec, out / "mi_maps_kvasir.png")
        scatter_figure(groups, out / "signal_vs_error_kvasir.png", f"{title}, {_split(spec)} split")
    if args.chase:
        spec = yaml.safe_load(args.chase[0].read_text())
        output = args.chase[1]
        folders = sorted(p for p in (output / _split(spec) / args.chase_method).glob("seed*")
                         if (p / "signals" / "test.npz").is_file())
        if folders:
            title = spec.get("title", _split(spec))
            t, r = signal_tables({"training": folders, "test": folders},
                                 f"{title}, {spec['methods'][args.chase_method]['label']}")
            text += f"\n## Signals, {title}\n\n" + t
            records["signals_chase"] = r
            scatter_figure({"training": folders}, out / "signal_vs_error_chase.png", title)
    if args.audit:
        spec = yaml.safe_load(args.audit[0].read_text())
        t, r = audit_table(args.audit[1], spec)
        text += "\n## Label audit rankings\n\n" + t
        records["audit"] = r
    _write(out / "tables.md", text)
    _write(out / "tables.json", json.dumps(records, indent=1) + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("corrupt", help="a prepared split with some training labels broken")
    c.add_argument("source", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--seed", type=int, default=0)
    for kind in KINDS:
        c.add_argument(f"--{kind}", type=int, default=0)
    for name, text in (("signals", "the signals of a study's trained runs"),
                       ("audit", "the audit's evidence at each saved epoch of runs trained on broken labels")):
        c = commands.add_parser(name, help=text)
        c.add_argument("study", type=Path, help="the study file the runs were trained with (benchmarks/study.py)")
        c.add_argument("--output", type=Path, required=True, help="the study's output folder")
        c.add_argument("--samples", type=int, default=20, help="N of each of the two independent halves")
        c.add_argument("--batch-size", type=int, default=16)
        c.add_argument("--force", action="store_true", help="measure again what was measured")
        if name == "signals":
            c.add_argument("--methods", nargs="*", help="only these methods of the study")
        else:
            c.add_argument("--epochs", type=int, nargs="*", help="only these epochs")
    c = commands.add_parser("report", help="the tables and figures of docs/results_difficulty.md")
    c.add_argument("--variants", type=Path, nargs=2, metavar=("STUDY", "OUTPUT"))
    c.add_argument("--chase", type=Path, nargs=2, metavar=("STUDY", "OUTPUT"))
    c.add_argument("--chase-method", default="unet_dice")
    c.add_argument("--audit", type=Path, nargs=2, metavar=("STUDY", "OUTPUT"))
    c.add_argument("--report", type=Path, required=True, help="folder of the tables and figures")
    args = parser.parse_args(argv)
    if args.command == "report":
        report_command(args)
    elif args.command == "signals":
        signals_command(args)
    elif args.command == "audit":
        audit_command(args)
    elif args.command == "corrupt":
        broken = corrupt(args.source, args.output, {k: getattr(args, k) for k in KINDS}, args.seed)
        print(f"{args.output}/datalist.json: " + ", ".join(f"{len(v)} {k}" for k, v in broken.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
