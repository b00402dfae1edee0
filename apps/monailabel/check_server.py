# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
End-to-end check of the bundle in a real MONAI Label server, offline, on loopback.

Run it with the Python of a MONAI Label environment (``apps/monailabel/requirements.txt``; docs/README.md)::

    .venv-label/bin/python apps/monailabel/check_server.py --work /tmp/mlcheck

What it does, each step checked, stopping at the first failure (exit status 1, the server stopped):

1. assembles an app: ``apps/monailabel/main.py`` (MONAI Label's ``monaibundle`` app + the bundle's MI score) and
   a copy of this bundle at ``<work>/app/model/polyp_bundle``; studies: ``--labelled`` + ``--unlabelled`` Kvasir-SEG
   JPEGs. It trains ``models/model.pt`` with the bundle's own ``training`` command on ``--train-frames`` other
   frames, unless ``--model`` gives weights. ``--image-size``/``--features`` set those ids in the copy's
   ``train.yaml`` and ``inference.yaml`` (a CPU-sized network that learns something in a minute); without them the
   copy is the bundle as it is (Table 1 U-Net at 224 px). ``--network NAME`` merges ``configs/network/NAME.yaml``
   into both (MONAI Label reads one config of each), so the app serves, trains and scores that network;
2. writes the reference mask of one unlabelled frame with the bundle's own inference (``configs/inference.yaml``);
3. starts ``monailabel start_server`` on 127.0.0.1 with ``--conf zoo_source github`` (no zoo download), the
   bundle as model and as ``epistemic_model`` (MONAI Label's epistemic scoring with the network's own dropout p);
4. inference request on that JPEG: the returned PNG must equal the reference mask pixel for pixel;
5. saves the labels of the labelled frames through the datastore API (0/1 PNG, as MONAI Label's viewers save
   them), then a training request (1 epoch): ``model.pt`` must be rewritten with new weights that load strictly,
   with its ``output_dir`` at ``<bundle>/eval``, where the difficulty pass of a longer training writes its label
   audit, ``label_audit.csv``;
6. scoring requests ``polyp_bundle`` (epistemic) and ``polyp_mi`` (the bundle's difficulty): every unlabelled
   image gets a finite score; ``polyp_mi`` is compared with the ``mean_mi_foreground`` of the bundle's own
   ``--mc_samples`` inference (dropout draws differ, so within a tolerance); the ``polyp_mi`` strategy must
   return the highest-scoring image;
7. scoring request ``label_audit``: ``eval/label_audit.csv`` must rank every labelled frame and each frame's
   ``label_audit`` must be its suspicion there, with ``model.pt``'s timestamp; a table found there (the first
   training's, of other frames) is not that audit, so the bundle's audit runs first.
   A second request changes nothing; with the records made older, a third reads the table without auditing. The
   ``label_audit`` strategy must serve the top of the audit; after the next frame's label is saved again, it must
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
from pathlib import Path

import numpy as np
import requests
import torch
from monai.bundle import ConfigParser
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BUNDLE_ROOT))
from scripts.audit import read_label_audit  # noqa: E402
from scripts.data import binarize_mask  # noqa: E402  the bundle's mask rule

APP_MAIN = Path(__file__).resolve().parent / "main.py"
NAME = "polyp_bundle"
BUNDLE_PARTS = ("configs", "scripts", "LICENSE", "README.md")


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
    """A Kvasir mask (RGB JPEG, ~47 grey levels), binarised as the bundle does, as a MONAI Label viewer's 0/1 PNG."""
    mask = np.moveaxis(np.atleast_3d(np.asarray(Image.open(mask_path))), -1, 0)  # (C, H, W)
    Image.fromarray(binarize_mask(mask)[0].astype(np.uint8)).save(out)


def assemble(args) -> dict:
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    app, studies = work / "app", work / "studies"
    bundle = app / "model" / NAME
    (bundle / "models").mkdir(parents=True)
    shutil.copy(APP_MAIN, app / "main.py")
    for part in BUNDLE_PARTS:
        src = BUNDLE_ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, bundle / part)
    # MONAI Label reads configs/metadata.json; the Model Zoo layout also has it at the root
    shutil.copy(BUNDLE_ROOT / "configs" / "metadata.json", bundle / "metadata.json")

    # MONAI Label reads one inference config and one training config, so a network overlay is merged into them
    overlay = ConfigParser.load_config_file(BUNDLE_ROOT / "configs" / "network" / f"{args.network}.yaml") \
        if args.network else {}
    if args.image_size or args.features or overlay:
        for name in ("train.yaml", "inference.yaml"):
            config = ConfigParser.load_config_file(bundle / "configs" / name)
            config.update(overlay)
            config.update({"image_size": args.image_size or config["image_size"],
                           "features": args.features or config["features"]})
            ConfigParser.export_config_file(config, str(bundle / "configs" / name), fmt="yaml")

    needed = args.labelled + args.unlabelled + (0 if args.model else args.train_frames)
    stems = sorted(p.stem for p in (args.data / "images").glob("*.jpg"))[:needed]
    if len(stems) < needed:
        raise CheckFailed(f"{args.data / 'images'} holds {len(stems)} JPEGs, {needed} needed")
    stems, train_stems = stems[: args.labelled + args.unlabelled], stems[args.labelled + args.unlabelled:]
    studies.mkdir(parents=True)
    for s in stems:
        shutil.copy(args.data / "images" / f"{s}.jpg", studies / f"{s}.jpg")
    labelled, unlabelled = stems[: args.labelled], stems[args.labelled:]
    labels = work / "labels01"
    labels.mkdir()
    for s in labelled:
        binary_png(args.data / "masks" / f"{s}.jpg", labels / f"{s}.png")

    if args.model:
        shutil.copy(args.model, bundle / "models" / "model.pt")
    else:
        print(f"training models/model.pt with the bundle's own command: {len(train_stems)} frames, "
              f"{args.train_epochs} epochs ...", flush=True)
        n_val = max(1, len(train_stems) // 5)
        pairs = [{"image": str(args.data / "images" / f"{s}.jpg"), "label": str(args.data / "masks" / f"{s}.jpg")}
                 for s in train_stems]
        (work / "datalist.json").write_text(json.dumps({"training": pairs[n_val:], "validation": pairs[:n_val]}))
        bundle_cli("run", "training", "--config_file", "configs/train.yaml", "--dataset_dir", str(work),
                   "--epochs", str(args.train_epochs), "--num_workers", "0", "--batch_size", "8",
                   cwd=bundle, log=work / "bundle_training.log")
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
           "--conf", "models", NAME, "--conf", "zoo_source", "github", "--conf", "preload", "false",
           "--conf", "sam2", "false", "--conf", "epistemic_model", NAME,
           "--conf", "epistemic_dropout", str(args.dropout), "--conf", "epistemic_simulation_size", "4",
           "--conf", "polyp_mi_samples", str(args.mc_samples)]
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


def run_checks(ctx: dict, args, summary: dict) -> None:
    info = requests.get(f"{args.url}/info/", timeout=30).json()
    check(NAME in info["models"] and NAME in info["trainers"], f"/info/ lists {NAME} as model and trainer")
    check({NAME, "polyp_mi"} <= set(info["scoring"]), f"/info/ lists the scoring methods {NAME} and polyp_mi")
    check({"polyp_mi", "label_audit"} <= set(info["scoring"]), "/info/ lists the scoring method label_audit")
    check({"polyp_mi", "epistemic", "label_audit"} <= set(info["strategies"]),
          "/info/ lists the strategies polyp_mi, epistemic, label_audit")
    check(info["models"][NAME]["labels"] == {"polyp": 1}, "the label is polyp = 1 (metadata.json channel_def)")

    # 4. inference on a JPEG equals the bundle's own inference
    frame = ctx["unlabelled"][0]
    reference = np.asarray(Image.open(ctx["bundle_out"] / f"{frame}_mask.png")) > 127
    r = post(args, f"/infer/{NAME}", params={"image": frame, "output": "image"},
             data={"params": json.dumps({"result_extension": ".png", "result_dtype": "uint8", "device": "cpu"})})
    served = ctx["work"] / f"served_{frame}.png"
    served.write_bytes(r.content)
    served_mask = np.asarray(Image.open(served))
    check(served_mask.shape == reference.shape, f"served mask has the frame's size {reference.shape}")
    check(set(np.unique(served_mask)) <= {0, 1}, "served mask is 0/1")
    differ = int(((served_mask > 0) != reference).sum())
    check(reference.any(), "the bundle's inference finds a polyp in the frame (else the comparison is empty)")
    check(differ == 0, f"served mask equals the bundle's inference mask ({int(reference.sum())} polyp pixels, "
                       f"{differ} differ)")
    summary["inference"] = {"frame": frame, "polyp_pixels": int(reference.sum()), "pixels_differing": differ}

    # 5. labels through the datastore, then training
    for s in ctx["labelled"]:
        save_label(ctx, args, s)
    datastore = requests.get(f"{args.url}/datastore/", params={"output": "all"}, timeout=60).json()
    labelled = sorted(k for k, v in datastore["objects"].items() if v.get("labels", {}).get("final"))
    check(labelled == sorted(ctx["labelled"]), f"{len(labelled)} labels saved through the datastore API")

    model_pt = ctx["bundle"] / "models" / "model.pt"
    before = torch.load(model_pt, map_location="cpu", weights_only=True)
    mtime = model_pt.stat().st_mtime
    begin = time.time()
    post(args, f"/train/{NAME}", params={"run_sync": "true"},
         json={"max_epochs": 1, "val_split": 0.34, "device": "cpu", "multi_gpu": False, "pretrained": True})
    seconds = time.time() - begin
    check(model_pt.stat().st_mtime > mtime, f"the training request rewrote models/model.pt ({seconds:.0f} s)")
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
    summary["training"] = {"labelled": len(labelled), "seconds": round(seconds, 1), "tensors_changed": changed}

    # 6. scoring and the strategy
    ctx["mc_out"] = bundle_inference(ctx, ctx["unlabelled"], ctx["work"] / "bundle_mc", args.mc_samples)
    for method in (NAME, "polyp_mi"):
        post(args, f"/scoring/{method}", params={"run_sync": "true"}, json={"device": "cpu", "max_workers": 1})
    scores = {}
    for s in ctx["unlabelled"]:
        image_info = requests.get(f"{args.url}/datastore/image/info", params={"image": s}, timeout=30).json()
        scores[s] = {"epistemic_entropy": image_info.get("epistemic_entropy"), "polyp_mi": image_info.get("polyp_mi")}
    check(all(np.isfinite(v["epistemic_entropy"] or np.nan) for v in scores.values()),
          f"epistemic_entropy for all {len(scores)} unlabelled images")
    check(all(np.isfinite(v["polyp_mi"] or np.nan) and v["polyp_mi"] >= 0 for v in scores.values()),
          "polyp_mi >= 0 for every unlabelled image")
    with open(ctx["mc_out"] / "uncertainty.csv") as f:
        rows = {Path(r["image"]).stem: r for r in csv.DictReader(f)}
    for s, v in scores.items():
        ref = float(rows[s]["mean_mi_foreground"] or "nan")
        v["bundle_mean_mi_foreground"] = ref
        if np.isfinite(ref):  # the same quantity, from other dropout draws
            check(abs(v["polyp_mi"] - ref) <= 0.25 * ref + 0.01,
                  f"{s}: polyp_mi {v['polyp_mi']:.4f} matches the bundle's MC inference {ref:.4f}")
    nxt = post(args, "/activelearning/polyp_mi", json={}).json()
    best = max(scores, key=lambda s: scores[s]["polyp_mi"])
    check(nxt.get("id") == best, f"the polyp_mi strategy serves the most uncertain image {best}")
    summary["scores"] = scores
    summary["next_image"] = nxt.get("id")

    # 7. the label audit as scoring and strategy
    summary["label_audit"] = check_label_audit(ctx, args, table, model_pt)


def save_label(ctx: dict, args, frame: str) -> None:
    """The frame's 0/1 PNG as its final label, through the datastore API, as a viewer saves it."""
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
    parser.add_argument("--data", type=Path, default=BUNDLE_ROOT.parent / "shared" / "data" / "kvasir-seg",
                        help="a Kvasir-SEG folder (images/*.jpg, masks/*.jpg)")
    parser.add_argument("--model", type=Path, help="weights for models/model.pt (default: train them, --train-frames/--train-epochs)")
    parser.add_argument("--train-frames", type=int, default=60, help="frames of the bundle's own training")
    parser.add_argument("--train-epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, help="image_size of the bundle copy (default: the bundle's)")
    parser.add_argument("--features", type=json.loads, help='features of the bundle copy, as JSON, e.g. '
                        '"[16,32,64,128,128]" (default: the bundle\'s, or the overlay\'s)')
    parser.add_argument("--network", help="a network overlay of configs/network/ (e.g. unet), merged into the copy's "
                        "train.yaml and inference.yaml (default: the bundle's DropoutUNet)")
    parser.add_argument("--labelled", type=int, default=6)
    parser.add_argument("--unlabelled", type=int, default=3)
    parser.add_argument("--mc-samples", type=int, default=10)
    parser.add_argument("--dropout", type=float, default=0.5, help="epistemic_dropout: the bundle's dropout p")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--startup-timeout", type=int, default=300)
    parser.add_argument("--request-timeout", type=int, default=1200)
    args = parser.parse_args()
    args.url = f"http://127.0.0.1:{args.port}"
    if args.model and not args.model.is_file():
        print(f"error: --model {args.model} is not a file", file=sys.stderr)
        return 2
    for d in (args.data / "images", args.data / "masks"):
        if not d.is_dir():
            print(f"error: {d} is not a folder (--data must be a Kvasir-SEG folder)", file=sys.stderr)
            return 2

    summary: dict = {"ok": False}
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
