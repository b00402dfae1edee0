# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
End-to-end check of the bundle in a real MONAI Label server, offline, on loopback, for the polyp task
(``--task polyp``, Kvasir-SEG) or the vessel task (``--task vessel``, CHASE_DB1).

Run it with the Python of a MONAI Label environment (``apps/monailabel/requirements.txt``; docs/README.md)::

    .venv-label/bin/python apps/monailabel/check_server.py --work /tmp/mlcheck
    .venv-label/bin/python apps/monailabel/check_server.py --work /tmp/mlcheck --task vessel

What it does, each step checked, stopping at the first failure (exit status 1, the server stopped):

1. assembles an app: ``apps/monailabel/main.py`` (MONAI Label's ``monaibundle`` app + the bundle's scores) and a
   copy of this bundle at ``<work>/app/model/<task>_bundle``; studies: ``--labelled`` + ``--unlabelled`` images of
   ``--data``. MONAI Label reads one inference config and one training config, so the copy's ``train.yaml`` and
   ``inference.yaml`` are the bundle's with the task's overlays merged in (vessel: ``configs/vessel/train.yaml``,
   ``configs/vessel/inference.yaml``), then ``--network NAME``'s (``configs/network/NAME.yaml``, for the vessel
   task ``configs/vessel/NAME.yaml``), then ``--image-size``/``--features``/``--patch-size``/
   ``--patches-per-image`` (a CPU-sized network that learns something in a minute; without any of them the polyp
   copy is the bundle as it is). The copy keeps the bundle's ``models/`` and ``eval/`` (MONAI Label reads
   ``models/model.pt``), and its ``metadata.json`` names the task's label. It trains ``models/model.pt`` with the
   bundle's own ``training`` command on ``--train-frames`` other images (vessel: with fields of view derived as
   ``scripts.prepare_data`` derives them), unless ``--model`` gives weights;
2. writes the reference outputs of one unlabelled image with the bundle's own inference (the copy's
   ``configs/inference.yaml``: the mask and, for the vessel task, ``<stem>_topology.png``);
3. starts ``monailabel start_server`` on 127.0.0.1 with ``--conf zoo_source github`` (no zoo download), the
   bundle as model and as ``epistemic_model`` (MONAI Label's epistemic scoring with the network's own dropout p);
4. inference request on that image: the returned PNG must equal the reference mask pixel for pixel, and each
   report the bundle's inference writes without ``mc_samples`` (vessel: the topology picture) must be in the
   request's report folder, equal to the reference pixel for pixel;
5. saves the labels of the labelled images through the datastore API (0/1 PNG, as MONAI Label's viewers save
   them), then a training request (``val_interval`` epochs, so that validation runs and keeps ``model.pt``):
   ``model.pt`` must be rewritten with new weights that load strictly, with its ``output_dir`` at
   ``<bundle>/eval``, where the difficulty pass of a longer training writes its label audit,
   ``label_audit.csv``;
6. an inference request with ``mc_samples`` N: its uncertainty maps, ``uncertainty.csv`` row (and topology
   picture) must be those of the bundle's own ``--mc_samples N`` inference of the unlabelled images, whose first
   image it is (the same dropout masks, from the same seed: equal to float rounding, ``MC_TOLERANCE``); then
   scoring requests ``<task>_bundle`` (epistemic) and ``<label>_mi`` (the bundle's difficulty): every unlabelled
   image gets a finite score; ``<label>_mi`` is compared with that inference's ``mean_mi_foreground`` (the
   scoring's dropout draws differ, so within a tolerance); the ``<label>_mi`` strategy must return the
   highest-scoring image;
7. scoring request ``label_audit``: ``eval/label_audit.csv`` must rank every labelled image and each image's
   ``label_audit`` must be its suspicion there, with ``model.pt``'s timestamp; a table found there (the first
   training's, of other images) is not that audit, so the bundle's audit (``configs/audit.yaml`` on the copy's
   ``train.yaml``, with the fields of view for the vessel task) runs first.
   A second request changes nothing; with the records made older, a third reads the table without auditing. The
   ``label_audit`` strategy must serve the top of the audit; after the next image's label is saved again, it must
   serve the one after (the served and the re-saved label are passed over);
8. stops the server and prints a JSON summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch
from monai.bundle import ConfigParser
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BUNDLE_ROOT))
from scripts.audit import read_label_audit  # noqa: E402
from scripts.data import binarize_mask  # noqa: E402  the bundle's mask rule
from scripts.prepare_data import write_fov_masks  # noqa: E402  the bundle's field of view rule

APP_MAIN = Path(__file__).resolve().parent / "main.py"
BUNDLE_PARTS = ("configs", "scripts", "LICENSE", "README.md")
DATA = BUNDLE_ROOT.parent / "shared" / "data"
MC_TOLERANCE = 1e-4  # MC maps: largest difference; MC masks and pictures: share of the pixels that may differ


@dataclass
class Task:
    """One task of the bundle as the check serves it: its data layout, its overlays and its check sizes."""

    name: str
    label: str  # the foreground's name: metadata.json's channel_def, the scores' prefix
    data: Path  # default --data
    image_glob: str
    mask_name: str  # a mask's path relative to --data, from the image's stem
    overlays: dict = field(default_factory=dict)  # config of the copy: the overlay merged into it
    network_dir: str = "configs/network"
    fov: bool = False  # the training reads a field of view
    defaults: dict = field(default_factory=dict)  # argument defaults of this task
    train_args: tuple = ()  # for the bundle's own training of the first model.pt

    def images(self, data: Path) -> list[str]:
        return sorted(p.stem for p in data.glob(self.image_glob))

    def mask(self, data: Path, stem: str) -> Path:
        return data / self.mask_name.format(stem=stem)


TASKS = {
    "polyp": Task("polyp", "polyp", DATA / "kvasir-seg", "images/*.jpg", "masks/{stem}.jpg",
                  defaults={"labelled": 6, "unlabelled": 3, "train_frames": 60, "train_epochs": 15,
                            "batch_size": 8}),
    "vessel": Task("vessel", "vessel", DATA / "chase-db1", "Image_*.jpg", "{stem}_1stHO.png",
                   overlays={"train.yaml": "configs/vessel/train.yaml",
                             "inference.yaml": "configs/vessel/inference.yaml"},
                   network_dir="configs/vessel", fov=True,
                   defaults={"labelled": 4, "unlabelled": 2, "train_frames": 8, "train_epochs": 20,
                             "batch_size": 2, "audit_samples": 4},
                   # no difficulty pass: at full resolution it costs minutes a pass on a CPU, and the first model
                   # needs no adaptive eps (the label audit runs the same pass, on the labelled images)
                   train_args=("--mc_start", "1000")),
}


class CheckFailed(RuntimeError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    print(f"  ok: {message}", flush=True)


def bundle_cli(*args: str, cwd: Path, log: Path) -> None:
    """``python -m monai.bundle <args>`` in ``cwd``; the log goes to ``log``."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise CheckFailed(f"monai.bundle {args[0]} {args[1] if len(args) > 1 else ''} failed: see {log}")


def binary_png(mask_path: Path, out: Path) -> None:
    """A mask (Kvasir's RGB JPEG with ~47 grey levels, CHASE_DB1's 0/255 PNG), binarised as the bundle does, as a
    MONAI Label viewer's 0/1 PNG."""
    mask = np.moveaxis(np.atleast_3d(np.asarray(Image.open(mask_path))), -1, 0)  # (C, H, W)
    Image.fromarray(binarize_mask(mask)[0].astype(np.uint8)).save(out)


def write_configs(bundle: Path, task: Task, args) -> None:
    """The copy's ``train.yaml`` and ``inference.yaml``: the bundle's, the task's and the network's overlays merged
    (MONAI Label reads one config of each), then the check's sizes."""
    sizes = {"image_size": args.image_size, "features": args.features, "patch_size": args.patch_size,
             "patches_per_image": args.patches_per_image}
    for name, own in (("train.yaml", {"mc_samples": args.audit_samples}), ("inference.yaml", {})):
        ids = {k: v for k, v in {**sizes, **own}.items() if v is not None}
        files = [BUNDLE_ROOT / "configs" / name]
        files += [BUNDLE_ROOT / task.overlays[name]] if name in task.overlays else []
        files += [BUNDLE_ROOT / task.network_dir / f"{args.network}.yaml"] if args.network else []
        if len(files) == 1 and not ids:
            continue  # the bundle's own config, as it is
        base = ConfigParser.load_config_file(files[0])
        config = ConfigParser.load_config_files(files)
        # MONAI Label serves and fine-tunes <bundle>/models/model.pt: a copy holds one task, so it keeps the bundle's
        # own folders (the vessel overlays' models/vessel and eval/vessel share a bundle with the polyp task)
        config.update({k: base[k] for k in ("ckpt_dir", "output_dir")})
        # MONAI Label's epistemic scoring sets network_def#dropout, so network_def must be the network's definition,
        # not a reference (the vessel configs' "@backbone_def"): the two are swapped, which builds the same network
        ref = config.get("network_def")
        if isinstance(ref, str) and ref.startswith("@") and isinstance(config.get(ref[1:]), dict):
            config["network_def"], config[ref[1:]] = config[ref[1:]], "@network_def"
        config.update({k: v for k, v in ids.items() if k in config})
        ConfigParser.export_config_file(config, str(bundle / "configs" / name), fmt="yaml")


def assemble(args) -> dict:
    work, task = args.work, args.task
    if work.exists():
        shutil.rmtree(work)
    app, studies = work / "app", work / "studies"
    bundle = app / "model" / args.name
    (bundle / "models").mkdir(parents=True)
    shutil.copy(APP_MAIN, app / "main.py")
    for part in BUNDLE_PARTS:
        src = BUNDLE_ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, bundle / part)
    write_configs(bundle, task, args)
    # MONAI Label names the label from configs/metadata.json; the Model Zoo layout also has it at the root
    metadata = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    for output in metadata["network_data_format"]["outputs"].values():
        output["channel_def"] = {"0": "background", "1": task.label}
    for path in (bundle / "configs" / "metadata.json", bundle / "metadata.json"):
        path.write_text(json.dumps(metadata, indent=4))

    needed = args.labelled + args.unlabelled + (0 if args.model else args.train_frames)
    stems = task.images(args.data)[:needed]
    if len(stems) < needed:
        raise CheckFailed(f"{args.data} holds {len(stems)} images ({task.image_glob}), {needed} needed")
    stems, train_stems = stems[: args.labelled + args.unlabelled], stems[args.labelled + args.unlabelled:]
    studies.mkdir(parents=True)
    for s in stems:
        shutil.copy(args.data / Path(task.image_glob).parent / f"{s}.jpg", studies / f"{s}.jpg")
    labelled, unlabelled = stems[: args.labelled], stems[args.labelled:]
    labels = work / "labels01"
    labels.mkdir()
    for s in labelled:
        binary_png(task.mask(args.data, s), labels / f"{s}.png")

    if args.model:
        shutil.copy(args.model, bundle / "models" / "model.pt")
    else:
        print(f"training models/model.pt with the bundle's own command: {len(train_stems)} images, "
              f"{args.train_epochs} epochs ...", flush=True)
        n_val = max(1, len(train_stems) // 5)
        pairs = [{"image": args.data / Path(task.image_glob).parent / f"{s}.jpg", "label": task.mask(args.data, s)}
                 for s in train_stems]
        if task.fov:
            write_fov_masks(pairs, work)  # <work>/fov, as prepare_data derives CHASE_DB1's
        pairs = [{k: str(v) for k, v in p.items()} for p in pairs]
        (work / "datalist.json").write_text(json.dumps({"training": pairs[n_val:], "validation": pairs[:n_val]}))
        bundle_cli("run", "training", "--config_file", "configs/train.yaml", "--dataset_dir", str(work),
                   "--epochs", str(args.train_epochs), "--num_workers", "0", "--batch_size", str(args.batch_size),
                   *task.train_args, cwd=bundle, log=work / "bundle_training.log")
    check((bundle / "models" / "model.pt").is_file(), f"bundle at {bundle} with models/model.pt")
    return {"work": work, "app": app, "studies": studies, "bundle": bundle, "labels": labels,
            "labelled": labelled, "unlabelled": unlabelled}


def bundle_inference(ctx: dict, frames: list[str], out: Path, mc_samples: int) -> Path:
    inp = out / "in"
    inp.mkdir(parents=True)
    for s in frames:
        shutil.copy(ctx["studies"] / f"{s}.jpg", inp / f"{s}.jpg")
    bundle_cli("run", "--config_file", "configs/inference.yaml", "--input_dir", str(inp), "--output_dir",
               str(out), "--num_workers", "0", "--mc_samples", str(mc_samples), cwd=ctx["bundle"],
               log=out / "inference.log")
    return out


def start_server(ctx: dict, args) -> subprocess.Popen:
    monailabel = Path(sys.executable).with_name("monailabel")
    cmd = [str(monailabel), "start_server", "--app", str(ctx["app"]), "--studies", str(ctx["studies"]),
           "--host", "127.0.0.1", "--port", str(args.port),
           "--conf", "models", args.name, "--conf", "zoo_source", "github", "--conf", "preload", "false",
           "--conf", "sam2", "false", "--conf", "epistemic_model", args.name,
           "--conf", "epistemic_dropout", str(args.dropout), "--conf", "epistemic_simulation_size", "4",
           "--conf", f"{args.score}_samples", str(args.mc_samples)]
    log = open(ctx["work"] / "server.log", "w")
    # the monailabel launcher runs `python` from PATH: make it this environment's
    env = dict(os.environ, PATH=f"{monailabel.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               MONAI_LABEL_AUTO_UPDATE_SCORING="false")
    print("starting:", " ".join(cmd), flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ctx["work"], env=env,
                              start_new_session=True)
    deadline = time.time() + args.startup_timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"the server exited with {server.returncode}: see {ctx['work'] / 'server.log'}")
        try:
            if requests.get(f"{args.url}/info/", timeout=5).ok:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(2)
    raise CheckFailed(f"no answer from {args.url} within {args.startup_timeout} s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def post(args, path: str, **kwargs) -> requests.Response:
    r = requests.post(f"{args.url}{path}", timeout=args.request_timeout, **kwargs)
    if not r.ok:
        raise CheckFailed(f"POST {path} answered {r.status_code}: {r.text[:500]}")
    return r


def infer(args, frame: str, output: str, **params) -> requests.Response:
    """``/infer/<model>`` on ``frame``: the label as a 0/1 PNG (``output`` image) or the result's params (json)."""
    params = {"result_extension": ".png", "result_dtype": "uint8", "device": "cpu", **params}
    return post(args, f"/infer/{args.name}", params={"image": frame, "output": output},
                data={"params": json.dumps(params)})


def same_pictures(a: Path, b: Path) -> int:
    """Pixels that differ between two pictures (-1 if their sizes differ)."""
    x, y = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    return -1 if x.shape != y.shape else int((x != y).any(axis=-1).sum() if x.ndim == 3 else (x != y).sum())


def run_checks(ctx: dict, args, summary: dict) -> None:
    name, score, label = args.name, args.score, args.task.label
    info = requests.get(f"{args.url}/info/", timeout=30).json()
    check(name in info["models"] and name in info["trainers"], f"/info/ lists {name} as model and trainer")
    check({name, score} <= set(info["scoring"]), f"/info/ lists the scoring methods {name} and {score}")
    check({score, "label_audit"} <= set(info["scoring"]), "/info/ lists the scoring method label_audit")
    check({score, "epistemic", "label_audit"} <= set(info["strategies"]),
          f"/info/ lists the strategies {score}, epistemic, label_audit")
    check(info["models"][name]["labels"] == {label: 1}, f"the label is {label} = 1 (metadata.json channel_def)")

    # 4. inference on an image equals the bundle's own inference, reports included
    frame = ctx["unlabelled"][0]
    reference = np.asarray(Image.open(ctx["bundle_out"] / f"{frame}_mask.png")) > 127
    served = ctx["work"] / f"served_{frame}.png"
    served.write_bytes(infer(args, frame, "image").content)
    served_mask = np.asarray(Image.open(served))
    check(served_mask.shape == reference.shape, f"served mask has the image's size {reference.shape}")
    check(set(np.unique(served_mask)) <= {0, 1}, "served mask is 0/1")
    differ = int(((served_mask > 0) != reference).sum())
    check(reference.any(), f"the bundle's inference finds {label} in the image (else the comparison is empty)")
    check(differ == 0, f"served mask equals the bundle's inference mask ({int(reference.sum())} {label} pixels, "
                       f"{differ} differ)")
    reports = ctx["bundle"] / "eval" / "inference" / frame  # <output_dir>/<image> of the copy's inference.yaml
    pictures = sorted(p.name for p in ctx["bundle_out"].glob(f"{frame}_*.png") if p.name != f"{frame}_mask.png")
    for picture in pictures:
        check((reports / picture).is_file() and same_pictures(reports / picture, ctx["bundle_out"] / picture) == 0,
              f"the request's {picture} equals the bundle's pixel for pixel")
    summary["inference"] = {"frame": frame, f"{label}_pixels": int(reference.sum()), "pixels_differing": differ,
                            "reports_equal": pictures}

    # 5. labels through the datastore, then training
    for s in ctx["labelled"]:
        save_label(ctx, args, s)
    datastore = requests.get(f"{args.url}/datastore/", params={"output": "all"}, timeout=60).json()
    labelled = sorted(k for k, v in datastore["objects"].items() if v.get("labels", {}).get("final"))
    check(labelled == sorted(ctx["labelled"]), f"{len(labelled)} labels saved through the datastore API")

    model_pt = ctx["bundle"] / "models" / "model.pt"
    before = torch.load(model_pt, map_location="cpu", weights_only=True)
    mtime = model_pt.stat().st_mtime
    training = ConfigParser()
    training.read_config(str(ctx["bundle"] / "configs" / "train.yaml"))
    epochs = max(1, int(training["val_interval"]))  # model.pt is the best validation's: validation must run
    begin = time.time()
    post(args, f"/train/{name}", params={"run_sync": "true"},
         json={"max_epochs": epochs, "val_split": 0.34, "device": "cpu", "multi_gpu": False, "pretrained": True})
    seconds = time.time() - begin
    check(model_pt.stat().st_mtime > mtime, f"the training request rewrote models/model.pt ({epochs} epochs, "
                                            f"{seconds:.0f} s)")
    after = torch.load(model_pt, map_location="cpu", weights_only=True)
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    check(set(after) == set(before) and changed > 0, f"new weights: {changed}/{len(before)} tensors changed")
    inference = ConfigParser()
    inference.read_config(str(ctx["bundle"] / "configs" / "inference.yaml"))
    inference.update({"bundle_root": str(ctx["bundle"]), "device": "cpu"})
    try:
        inference.get_parsed_content("network_def").load_state_dict(after)
    except RuntimeError as e:
        raise CheckFailed(f"the new model.pt does not load into the bundle's network: {e}") from e
    check(True, "the new model.pt loads strictly into the bundle's network_def")
    # output_dir, where a training's difficulty passes write label_audit.csv (none in 1 epoch: E0 0, tau 10)
    table = ctx["bundle"] / "eval" / "label_audit.csv"
    events = [p for p in table.parent.glob("events.out.tfevents.*") if p.stat().st_mtime >= begin]
    check(bool(events), "the training request's output_dir is <bundle>/eval (its TensorBoard events are there)")
    if args.task.fov:
        fovs = [ctx["bundle"] / "eval" / "fov" / f"{s}_fov.png" for s in ctx["labelled"]]
        check(all(p.is_file() for p in fovs), "the training request derived each labelled image's field of view "
                                              "into <bundle>/eval/fov")
    summary["training"] = {"labelled": len(labelled), "epochs": epochs, "seconds": round(seconds, 1),
                           "tensors_changed": changed}

    # 6. MC inference request, scoring and the strategy
    ctx["mc_out"] = bundle_inference(ctx, ctx["unlabelled"], ctx["work"] / "bundle_mc", args.mc_samples)
    summary["mc_inference"] = check_mc_inference(ctx, args, frame, reports)
    for method in (name, score):
        post(args, f"/scoring/{method}", params={"run_sync": "true"}, json={"device": "cpu", "max_workers": 1})
    scores = {}
    for s in ctx["unlabelled"]:
        image_info = requests.get(f"{args.url}/datastore/image/info", params={"image": s}, timeout=30).json()
        scores[s] = {"epistemic_entropy": image_info.get("epistemic_entropy"), score: image_info.get(score)}
    check(all(np.isfinite(v["epistemic_entropy"] or np.nan) for v in scores.values()),
          f"epistemic_entropy for all {len(scores)} unlabelled images")
    check(all(np.isfinite(v[score] or np.nan) and v[score] >= 0 for v in scores.values()),
          f"{score} >= 0 for every unlabelled image")
    with open(ctx["mc_out"] / "uncertainty.csv") as f:
        rows = {Path(r["image"]).stem: r for r in csv.DictReader(f)}
    for s, v in scores.items():
        ref = float(rows[s]["mean_mi_foreground"] or "nan")
        v["bundle_mean_mi_foreground"] = ref
        if np.isfinite(ref):  # the same quantity, from other dropout draws
            check(abs(v[score] - ref) <= 0.25 * ref + 0.01,
                  f"{s}: {score} {v[score]:.4f} matches the bundle's MC inference {ref:.4f}")
    nxt = post(args, f"/activelearning/{score}", json={}).json()
    best = max(scores, key=lambda s: scores[s][score])
    check(nxt.get("id") == best, f"the {score} strategy serves the most uncertain image {best}")
    summary["scores"] = scores
    summary["next_image"] = nxt.get("id")

    # 7. the label audit as scoring and strategy
    summary["label_audit"] = check_label_audit(ctx, args, table, model_pt)


def check_mc_inference(ctx: dict, args, frame: str, reports: Path) -> dict:
    """Step 6: an inference request with ``mc_samples`` gives the bundle's own MC outputs for ``frame``."""
    params = infer(args, frame, "json", mc_samples=args.mc_samples).json()
    check(Path(params.get("report_dir", "")) == reports and "uncertainty" in params,
          f"the mc_samples request names its report folder and its uncertainty.csv row: {params.get('report_files')}")
    reference = ctx["mc_out"]
    with open(reference / "uncertainty.csv") as f:
        row = next(r for r in csv.DictReader(f) if Path(r["image"]).stem == frame)
    served = params["uncertainty"]
    # the same dropout masks (main.py seeds them as the bundle's inference does), summed in another order: the maps
    # agree to float rounding, so a pixel at the 0.5 threshold may fall either way
    pixels = int(row["height"]) * int(row["width"])
    area_differs = abs(int(served["area_pixels"]) - int(row["area_pixels"]))
    check(area_differs <= MC_TOLERANCE * pixels, f"its MC mask has the bundle's MC inference's {args.task.label} "
                                                 f"pixels ({row['area_pixels']}, {area_differs} differ)")
    maps = {}
    for name in ("probability", "variance", "entropy", "mutual_information"):
        a = np.asarray(nib.load(reports / f"{frame}_{name}.nii.gz").dataobj)
        b = np.asarray(nib.load(reference / f"{frame}_{name}.nii.gz").dataobj)
        maps[name] = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
    check(max(maps.values()) <= MC_TOLERANCE, f"its four maps are the bundle's MC inference's (largest difference "
                                              f"{max(maps.values()):.2g})")
    pictures = {p.name: same_pictures(reports / p.name, p) for p in reference.glob(f"{frame}_*.png")
                if p.name != f"{frame}_mask.png"}
    for picture, differ in sorted(pictures.items()):
        check(0 <= differ <= MC_TOLERANCE * pixels, f"its {picture} is the bundle's MC inference's ({differ} pixels "
                                                    "differ)")
    return {"frame": frame, "mc_samples": args.mc_samples, "area_pixels": int(row["area_pixels"]),
            "mean_mi_foreground": served["mean_mi_foreground"], "max_map_difference": maps,
            "mask_pixels_differing": area_differs, "picture_pixels_differing": pictures,
            "report_files": params["report_files"]}


def save_label(ctx: dict, args, frame: str) -> None:
    """The image's 0/1 PNG as its final label, through the datastore API, as a viewer saves it."""
    with open(ctx["labels"] / f"{frame}.png", "rb") as f:
        r = requests.put(f"{args.url}/datastore/label", params={"image": frame, "tag": "final"},
                         files={"label": (f"{frame}.png", f, "image/png")}, timeout=60)
    if not r.ok:
        raise CheckFailed(f"PUT /datastore/label {frame} answered {r.status_code}: {r.text[:300]}")


def check_label_audit(ctx: dict, args, table: Path, model_pt: Path) -> dict:
    """Step 7: the label audit as scoring method and strategy."""
    def score() -> dict:
        return post(args, "/scoring/label_audit", params={"run_sync": "true"}, json={"device": "cpu"}).json()

    def image_info(frame: str) -> dict:
        return requests.get(f"{args.url}/datastore/image/info", params={"image": frame}, timeout=30).json()

    before = [Path(r["image"]).stem for r in read_label_audit(table)] if table.is_file() else []
    first = score()
    check(first.get("audited") is True and first.get("executed") == len(ctx["labelled"]),
          f"label_audit scoring ran the bundle's audit on all {len(ctx['labelled'])} labelled frames "
          f"({first.get('latency')} s; before it, eval/label_audit.csv had {len(before)} rows)")
    rows = read_label_audit(table)
    ranked = [Path(r["image"]).stem for r in rows]  # most suspect first
    suspicion = {Path(r["image"]).stem: r["suspicion"] for r in rows}
    check(sorted(ranked) == sorted(ctx["labelled"]) and table.stat().st_mtime >= model_pt.stat().st_mtime,
          f"eval/label_audit.csv now ranks every labelled frame, with the current model.pt; top {ranked[0]}")
    model_ts = int(model_pt.stat().st_mtime)
    info = {s: image_info(s) for s in ranked}
    check(all(info[s].get("label_audit") == suspicion[s] and info[s].get("label_audit_ts") == model_ts
              for s in ranked), "every labelled frame's label_audit is its suspicion in the table, with model.pt's ts")
    check(score().get("executed") == 0, "a second label_audit scoring (same model, same labels) changes nothing")
    written = table.stat().st_mtime
    for s in ranked:  # as if the records came from an older model: the table is the newer audit
        r = requests.put(f"{args.url}/datastore/image/info", params={"image": s},
                         data={"info": json.dumps({"label_audit_ts": 0})}, timeout=30)
        if not r.ok:
            raise CheckFailed(f"PUT /datastore/image/info {s} answered {r.status_code}: {r.text[:300]}")
    third = score()
    check(third.get("audited") is False and third.get("executed") == len(ranked) and table.stat().st_mtime == written
          and all(image_info(s).get("label_audit_ts") == model_ts for s in ranked),
          "with older records, label_audit scoring reads the current eval/label_audit.csv without auditing again")

    def serve(passed_over: set, what: str) -> str:
        expected = next(s for s in ranked if s not in passed_over)  # a tie with it is as good
        got = post(args, "/activelearning/label_audit", json={}).json().get("id")
        check(got in suspicion and got not in passed_over and suspicion[got] == suspicion[expected],
              f"the label_audit strategy serves {got}, {what} ({expected}, suspicion {suspicion[expected]:.4g})")
        return got

    first_served = serve(set(), "the top of the audit")
    resaved = next(s for s in ranked if s != first_served)
    save_label(ctx, args, resaved)  # as an annotator who fixed it
    second_served = serve({first_served, resaved}, f"the next one: {first_served} served, {resaved} saved again")
    return {"ranked": ranked, "suspicion": suspicion, "served": [first_served, second_served], "resaved": resaved,
            "audited_on_first_scoring": first["audited"], "read_table_on_third": not third["audited"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the app, studies and logs (replaced)")
    parser.add_argument("--task", choices=sorted(TASKS), default="polyp",
                        help="polyp (Kvasir-SEG, the bundle as it is) or vessel (CHASE_DB1, configs/vessel/ merged)")
    parser.add_argument("--data", type=Path, help="a Kvasir-SEG folder (images/*.jpg, masks/*.jpg) or a CHASE_DB1 "
                        "folder (Image_NNx.jpg, Image_NNx_1stHO.png); default: the task's under ../shared/data")
    parser.add_argument("--model", type=Path, help="weights for models/model.pt (default: train them, "
                        "--train-frames/--train-epochs)")
    parser.add_argument("--train-frames", type=int, help="images of the bundle's own training (polyp 60, vessel 8)")
    parser.add_argument("--train-epochs", type=int, help="polyp 15, vessel 20")
    parser.add_argument("--batch-size", type=int, help="of the bundle's own training (polyp 8, vessel 2)")
    parser.add_argument("--image-size", type=int, help="image_size of the bundle copy (default: the bundle's)")
    parser.add_argument("--features", type=json.loads, help='features of the bundle copy, as JSON, e.g. '
                        '"[16,32,64,128,128]" (default: the bundle\'s, or the overlay\'s)')
    parser.add_argument("--patch-size", type=int, help="patch_size of the vessel copy (default: the overlay's, 48)")
    parser.add_argument("--patches-per-image", type=int, help="patches_per_image of the vessel copy (default: 32)")
    parser.add_argument("--audit-samples", type=int, help="mc_samples of the copy's train.yaml: N of the difficulty "
                        "pass and of the label audit (default: the bundle's 10; vessel 4, whole images on a CPU)")
    parser.add_argument("--network", help="a network overlay (polyp: configs/network/, e.g. unet; vessel: "
                        "configs/vessel/, e.g. frunet), merged into the copy's train.yaml and inference.yaml "
                        "(default: the bundle's DropoutUNet)")
    parser.add_argument("--labelled", type=int, help="polyp 6, vessel 4")
    parser.add_argument("--unlabelled", type=int, help="polyp 3, vessel 2")
    parser.add_argument("--mc-samples", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.5, help="epistemic_dropout: the bundle's dropout p")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--startup-timeout", type=int, default=300)
    parser.add_argument("--request-timeout", type=int, default=1200)
    args = parser.parse_args()
    args.task = TASKS[args.task]
    for key, value in args.task.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data = args.data or args.task.data
    args.name, args.score = f"{args.task.name}_bundle", f"{args.task.label}_mi"
    args.url = f"http://127.0.0.1:{args.port}"
    if args.model and not args.model.is_file():
        print(f"error: --model {args.model} is not a file", file=sys.stderr)
        return 2
    if not args.task.images(args.data):
        print(f"error: {args.data} holds no {args.task.image_glob} (--data must be a {args.task.name} data folder)",
              file=sys.stderr)
        return 2

    summary: dict = {"ok": False, "task": args.task.name}
    server = None
    begin = time.time()
    try:
        ctx = assemble(args)
        ctx["bundle_out"] = bundle_inference(ctx, ctx["unlabelled"][:1], args.work / "bundle_plain", 0)
        server = start_server(ctx, args)
        run_checks(ctx, args, summary)
        summary["ok"] = True
    except CheckFailed as e:
        print(f"FAILED: {e}", file=sys.stderr)
    finally:
        if server is not None:
            stop_server(server)
        summary["seconds"] = round(time.time() - begin, 1)
        print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
