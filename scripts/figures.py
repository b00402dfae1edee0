# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Figures of the uncertainty-adaptive training (method.md §3-4), drawn from what the MC-dropout pass writes to
the run's ``output_dir``:

- ``difficulty_history.csv``: one row per image per pass, columns ``pass, epoch, image, label, D, D_norm, eps,
  dice_error, seconds``;
- ``mc_maps/pass_{k:03d}.npz``: for a fixed subset of K images, ``ids`` (K,) str, ``epoch`` scalar,
  ``image`` (K, 3, H, W) in [0, 1], ``label`` (K, H, W) 0/1 and the (K, H, W) maps ``mean``, ``variance``,
  ``entropy``, ``mutual_information``. Spatial axes are in MONAI/PIL order (axis 0 is the frame's width).
- ``label_audit.csv`` and ``mc_maps/label_audit.npz``: the label audit of :mod:`scripts.audit`, the second with
  the layout above for its most suspect images.

Drawn with ``matplotlib.figure.Figure`` on the Agg canvas, not pyplot, so importing this module changes no
global matplotlib state (backend, open figures) of whoever else uses matplotlib in the process.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scripts.audit import read_label_audit
from scripts.files import atomic_path

__all__ = ["plot_uncertainty_evolution", "plot_epsilon_distribution", "plot_label_audit", "choose_images",
           "write_figures", "colour_map", "topology_overlay"]

# (npz key, column title, colour map, colour range): fixed ranges so that rows (passes) are comparable.
_MAPS = (
    ("mean", "mean prediction", "viridis", (0.0, 1.0)),
    ("variance", "variance", "magma", (0.0, 0.25)),  # a probability's variance is at most 1/4
    ("entropy", "entropy (nats)", "magma", (0.0, math.log(2))),  # binary entropy is at most log 2
    ("mutual_information", "mutual information (nats)", "magma", (0.0, math.log(2))),  # MI <= entropy
)
_HISTORY_COLUMNS = ("pass", "epoch", "image", "D", "D_norm", "eps")


def colour_map(values: np.ndarray, key: str) -> np.ndarray:
    """
    A map as an 8-bit RGB image for people to look at, with the colours and fixed range of the figures:
    ``mean`` (a foreground probability) in viridis on [0, 1], ``variance`` in magma on [0, 1/4], ``entropy`` and
    ``mutual_information`` in magma on [0, log 2]. Fixed ranges make images and runs comparable at a glance.

    Args:
        values: (*spatial) float map.
        key: one of ``mean``, ``variance``, ``entropy``, ``mutual_information``.

    Returns:
        (*spatial, 3) uint8.

    Memory: the map is coloured a block of rows at a time (matplotlib works in float64 RGBA, 32 bytes a pixel,
    plus temporaries), so beyond the 3-byte-a-pixel result it needs a few MB whatever the map's size.
    """
    ranges = {k: (cmap, lim) for k, _, cmap, lim in _MAPS}
    if key not in ranges:
        raise ValueError(f"key must be one of {sorted(ranges)}, got {key!r}.")
    cmap, (low, high) = ranges[key]

    def colour(block: np.ndarray) -> np.ndarray:
        scaled = np.clip((np.asarray(block, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        return (colormaps[cmap](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)

    values = np.asarray(values)
    out = np.empty((*values.shape, 3), dtype=np.uint8)
    rows = max(1, (1 << 18) // max(1, math.prod(values.shape[1:])))  # about 256 k pixels a block
    for start in range(0, len(values), rows):
        out[start:start + rows] = colour(values[start:start + rows])
    return out


# colours of topology_overlay (RGB)
TOPOLOGY_COLOURS = {"vessel": (255, 255, 255), "false_positive": (255, 165, 0), "missed": (40, 110, 255),
                    "break": (255, 0, 0), "fragment": (255, 0, 255)}


def topology_overlay(image: np.ndarray, defects: Mapping, pred: np.ndarray, label: np.ndarray | None = None,
                     radius: int | None = None) -> np.ndarray:
    """
    An (H, W, 3) uint8 picture of where a vessel mask breaks, for a person to look at: the photograph ``image``
    ((H, W) or (H, W, 3) in [0, 1]) in dimmed grey, and over it ``pred`` in white (orange where the ``label`` has no
    vessel), the label's vessels that ``pred`` misses in blue, and the ``defects`` of
    :func:`scripts.metrics.topology_defects`: each break in red and each fragment in magenta, with a ring of
    ``radius`` pixels (default: a 1/100 of the shorter side, at least 5) around it so a small one shows at any zoom.
    All arrays are (H, W), rows first.
    """
    from scipy import ndimage
    from skimage.draw import circle_perimeter

    from scripts.metrics import EIGHT

    grey = np.asarray(image, dtype=np.float32)
    grey = grey.mean(axis=-1) if grey.ndim == 3 else grey
    out = np.repeat((np.clip(grey, 0, 1) * 150).astype(np.uint8)[..., None], 3, axis=-1)
    p = np.asarray(pred, dtype=bool)
    out[p] = TOPOLOGY_COLOURS["vessel"]
    if label is not None:
        out[p & ~np.asarray(label, dtype=bool)] = TOPOLOGY_COLOURS["false_positive"]
        out[defects["missed"]] = TOPOLOGY_COLOURS["missed"]
    radius = radius or max(5, min(p.shape) // 100)
    for kind, colour in (("fragments", TOPOLOGY_COLOURS["fragment"]), ("breaks", TOPOLOGY_COLOURS["break"])):
        marks, n = ndimage.label(defects[kind], EIGHT)  # a defect's pieces, as topology_defects counts them
        out[marks > 0] = colour
        for r, c in ndimage.center_of_mass(marks > 0, marks, range(1, n + 1)):
            for width in (0, 1):  # a ring two pixels wide
                rr, cc = circle_perimeter(round(r), round(c), radius + width, shape=p.shape)
                out[rr, cc] = colour
    return out


def _display(a: np.ndarray) -> np.ndarray:
    """(C, W, H) or (W, H) in MONAI/PIL order -> (H, W, C) or (H, W) for ``imshow`` (rows = frame height)."""
    return a.transpose(2, 1, 0) if a.ndim == 3 else a.T


def _pass_number(path: Path, default: int) -> int:
    match = re.search(r"pass_(\d+)", path.stem)
    return int(match.group(1)) if match else default


def _save(fig: Figure, out_png: str | Path, dpi: int = 100) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches itself to fig: Agg rendering without pyplot's backend machinery
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi)
    return out_png


def _npz_ids(path: Path) -> list[str]:
    with np.load(path, allow_pickle=False) as data:  # ids must be a unicode array, not a pickled object array
        return [str(i) for i in data["ids"]]


def plot_uncertainty_evolution(
    map_files: Sequence[str | Path], image_id: str, out_png: str | Path, max_rows: int = 6
) -> Path:
    """
    Draw one PNG grid for ``image_id``: one row per MC pass (``map_files``, ``pass_k.npz`` files, drawn in
    pass order; at most ``max_rows`` passes, evenly spread, first and last included), columns: the frame with
    the ground-truth contour, then mean, variance, entropy and mutual information on fixed colour scales with
    one colour bar per column. Returns ``out_png``.

    Raises:
        ValueError: if ``map_files`` is empty or ``image_id`` is in none of them.
    """
    files = sorted((Path(f) for f in map_files), key=lambda f: (_pass_number(f, 0), f.name))
    if not files:
        raise ValueError(f"no MC map files given to plot image {image_id!r}.")
    if len(files) > max_rows:  # 200 epochs at tau = 10 are 20 passes: keep the first, the last and evenly between
        files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, max_rows).round().astype(int))]
    rows = []
    for i, path in enumerate(files, start=1):
        with np.load(path, allow_pickle=False) as data:
            ids = [str(s) for s in data["ids"]]
            if image_id not in ids:
                continue
            k = ids.index(image_id)
            maps = {key: _display(np.asarray(data[key][k], dtype=np.float32)) for key, *_ in _MAPS}
            rows.append((_pass_number(path, i), int(data["epoch"]), _display(np.clip(data["image"][k], 0, 1)),
                         _display(np.asarray(data["label"][k], dtype=np.float32)), maps))
    if not rows:
        raise ValueError(f"image {image_id!r} is in none of the {len(files)} MC map files "
                         f"({', '.join(f.name for f in files)}); they hold {_npz_ids(files[-1])}.")

    height, width = rows[0][2].shape[:2]
    panel = 2.2  # inches of the longer side of a panel
    scale = panel / max(height, width)
    fig = Figure(figsize=(5 * width * scale + 0.6, len(rows) * height * scale + 1.4), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), 5, squeeze=False))
    for r, (k, epoch, frame, label, maps) in enumerate(rows):
        axes[r, 0].imshow(frame)
        if label.min() != label.max():  # a contour of a constant mask is empty and warns
            axes[r, 0].contour(label, levels=[0.5], colors="lime", linewidths=1.0)
        axes[r, 0].set_ylabel(f"pass {k}, epoch {epoch}")
        for c, (key, _, cmap, (vmin, vmax)) in enumerate(_MAPS, start=1):
            im = axes[r, c].imshow(maps[key], cmap=cmap, vmin=vmin, vmax=vmax)
            if r == len(rows) - 1:
                fig.colorbar(im, ax=list(axes[:, c]), location="bottom", shrink=0.9)
    for c, title in enumerate(["frame + ground truth"] + [t for _, t, *_ in _MAPS]):
        axes[0, c].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(image_id, fontsize=9)
    return _save(fig, out_png)


def _read_history(history_csv: str | Path) -> list[dict]:
    with open(history_csv, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(_HISTORY_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{history_csv} lacks the column(s) {sorted(missing)}; expected {_HISTORY_COLUMNS}.")
        rows = [{**r, "pass": int(r["pass"]), "epoch": int(r["epoch"]), "D": float(r["D"]),
                 "eps": float(r["eps"])} for r in reader]
    if not rows:
        raise ValueError(f"{history_csv} holds no rows: no MC pass has run yet.")
    return rows


def plot_epsilon_distribution(history_csv: str | Path, out_png: str | Path) -> Path:
    """
    Draw, from ``difficulty_history.csv``, the distribution over the images of ε (top) and of the difficulty D
    (bottom) at each pass as box plots placed at the pass's epoch, with the medians joined by a line.
    Returns ``out_png``. Raises ValueError if the file lacks a column or holds no rows.
    """
    rows = _read_history(history_csv)
    passes = sorted({(r["pass"], r["epoch"]) for r in rows})
    epochs = [e for _, e in passes]
    # boxes as wide as 60% of the closest gap between passes, so they neither overlap nor vanish
    width = 0.6 * (min(np.diff(sorted(set(epochs))), default=1) or 1)
    fig = Figure(figsize=(max(6.0, 0.5 * len(passes) + 3), 6.5), layout="constrained")
    ax_eps, ax_d = fig.subplots(2, 1, sharex=True)
    for ax, key, ylabel in ((ax_eps, "eps", "ε (loss shape)"), (ax_d, "D", "difficulty D (nats)")):
        values = [[r[key] for r in rows if r["pass"] == p] for p, _ in passes]
        ax.boxplot(values, positions=epochs, widths=width, manage_ticks=False, flierprops={"markersize": 3},
                   medianprops={"color": "tab:red"})
        ax.plot(epochs, [np.median(v) for v in values], "o-", color="tab:red", markersize=3, label="median")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    eps = [r["eps"] for r in rows]  # the whole [0, 0.5] range by default, so runs and passes compare at a glance
    ax_eps.set_ylim(min(0.0, min(eps)) - 0.02, max(0.5, max(eps)) + 0.02)
    ax_eps.legend(loc="best")
    if len(epochs) <= 15:  # beyond that the default ticks read better than one per pass
        ax_d.set_xticks(epochs)
    ax_d.set_xlabel("epoch (start of the MC pass)")
    ax_d.set_xlim(min(epochs) - width, max(epochs) + width)
    n_images = len({r["image"] for r in rows})
    fig.suptitle(f"ε and difficulty over {len(passes)} MC pass(es), {n_images} images")
    return _save(fig, out_png)


def plot_label_audit(map_file: str | Path, audit_csv: str | Path, out_png: str | Path) -> Path:
    """
    The label-audit sheet for an annotator: one row per image of ``map_file`` (``mc_maps/label_audit.npz``), most
    suspect first, with the frame, its label, the mean prediction (each outlined on the frame) and the mutual
    information; the row title gives the rank, suspicion, 1 − Dice and D of ``audit_csv``. Returns ``out_png``.
    """
    rows = {r["label"]: r for r in read_label_audit(audit_csv)}
    with np.load(map_file, allow_pickle=False) as data:
        ids = [str(i) for i in data["ids"]]
        panels = [(rows.get(i), _display(np.clip(data["image"][k], 0, 1)), _display(data["label"][k]),
                   _display(data["mean"][k]), _display(data["mutual_information"][k])) for k, i in enumerate(ids)]
    panels.sort(key=lambda p: p[0]["rank"] if p[0] else float("inf"))
    height, width = panels[0][1].shape[:2]
    scale = 2.2 / max(height, width)
    fig = Figure(figsize=(4 * width * scale + 1.0, len(panels) * (height * scale + 0.5) + 0.6), layout="constrained")
    _, _, cmap, (vmin, vmax) = _MAPS[3]
    # one subfigure a row, so that each row's title gets its own space instead of overlapping the row above
    for row_figure, (row, frame, label, mean, mi) in zip(np.atleast_1d(fig.subfigures(len(panels), 1)), panels):
        axes = row_figure.subplots(1, 4)
        for ax, (outline, colour) in zip(axes, ((None, None), (label, "lime"), (mean, "red"))):
            ax.imshow(frame)
            if outline is not None and outline.min() < 0.5 < outline.max():
                ax.contour(outline, levels=[0.5], colors=colour, linewidths=1.0)
        im = axes[3].imshow(mi, cmap=cmap, vmin=vmin, vmax=vmax)
        row_figure.colorbar(im, ax=axes[3], shrink=0.8)
        for ax, title in zip(axes, ("frame", "label (green)", "mean prediction (red)", "mutual information (nats)")):
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row_figure.suptitle(f"#{row['rank']} {Path(row['image']).name}: suspicion {row['suspicion']:.2f}, "
                            f"1 − Dice {row['dice_error']:.2f}, D {row['D']:.3g}" if row else "not in the audit table",
                            fontsize=9, x=0.01, ha="left")
    fig.suptitle("labels to review first: the model is sure, and far from the label", fontsize=10)
    return _save(fig, out_png)


def choose_images(scores: Mapping[str, float], candidates: Sequence[str], n: int = 1) -> list[str]:
    """
    Pick the ``n`` hardest (lowest score, e.g. final Dice) and ``n`` easiest (highest score) of ``candidates``
    that have a finite score. Returns ``[hardest, 2nd hardest, ..., easiest, 2nd easiest, ...]`` without
    repeats (fewer than ``2 n`` ids when fewer candidates are scored); ties are broken by id.

    Raises:
        ValueError: if ``n < 1`` or no candidate has a finite score.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    ranked = sorted((float(scores[c]), c) for c in dict.fromkeys(candidates)
                    if c in scores and math.isfinite(float(scores[c])))
    if not ranked:
        raise ValueError(f"none of the {len(candidates)} candidate images has a finite score "
                         f"(candidates: {list(candidates)[:5]}...).")
    hardest = [c for _, c in ranked[:n]]
    easiest = [c for _, c in reversed(ranked[n:])][:n]
    return hardest + easiest


def write_figures(output_dir: str | Path, scores: Mapping[str, float] | None = None, n: int = 1) -> list[Path]:
    """
    Write ``output_dir/figures/epsilon_distribution.png`` from ``output_dir/difficulty_history.csv`` and one
    ``figures/uncertainty_<stem>.png`` per image chosen by :func:`choose_images` among the ids of
    ``output_dir/mc_maps/*.npz``: by ``scores`` (higher = easier, e.g. final Dice per training image) or, when
    ``scores`` is None, by the last pass's difficulty D (higher D = harder). Returns the written paths.
    """
    output_dir = Path(output_dir)
    history_csv = output_dir / "difficulty_history.csv"
    if not history_csv.is_file():
        raise FileNotFoundError(f"{history_csv} not found: was the MC difficulty handler attached to the run?")
    figures = output_dir / "figures"
    written = [plot_epsilon_distribution(history_csv, figures / "epsilon_distribution.png")]
    map_files = sorted((output_dir / "mc_maps").glob("pass_*.npz"))
    if not map_files:
        return written
    candidates = list(dict.fromkeys(i for f in map_files for i in _npz_ids(f)))
    if scores is None:
        rows = _read_history(history_csv)
        last = max(r["pass"] for r in rows)
        scores = {r["image"]: -r["D"] for r in rows if r["pass"] == last}  # negated: the highest D is hardest
    stems: set[str] = set()
    for image_id in choose_images(scores, candidates, n):
        stem = re.sub(r"[^\w.-]+", "_", Path(image_id).stem) or "image"
        while stem in stems:  # ids from different folders may share a file name
            stem += "_"
        stems.add(stem)
        written.append(plot_uncertainty_evolution(map_files, image_id, figures / f"uncertainty_{stem}.png"))
    return written
