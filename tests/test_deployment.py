"""Deployment: ONNX export, large_files.yml, MLflow tracking and the training contract of MONAI Label."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import monai.bundle
import yaml
from conftest import BUNDLE_ROOT, EVALUATE, TINY, TRAIN, parse, read_evaluation, read_json, run, trained_network
from PIL import Image
from scripts.data import binarize_mask


def test_onnx_export_gives_the_checkpoint_output(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements-dev.txt")
    onnx = tmp_path / "model.onnx"
    # `python -m monai.bundle onnx_export network_def ...`, in this process
    monai.bundle.onnx_export("network_def", filepath=str(onnx), ckpt_file=str(trained / "models" / "model.pt"),
                             meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
                             config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"), features=[4, 8, 8, 16, 16],
                             bundle_root=str(BUNDLE_ROOT))
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    assert image.shape == [1, 3, 224, 224]  # metadata.json's input: inference.yaml feeds one 224 px frame at a time
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = trained_network(trained)(x).numpy()
    np.testing.assert_allclose(session.run(None, {image.name: x.numpy()})[0], expected, rtol=1e-4, atol=1e-4)


def test_large_files_name_the_weights_the_workflows_read(trained, torchscript, tmp_path):
    entries = yaml.safe_load((BUNDLE_ROOT / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt", "models/model.ts"]
    inference = parse(["configs/inference.yaml"])
    assert inference.get_parsed_content("handlers#0#load_path") == f"{BUNDLE_ROOT}/models/model.pt"
    ignored = subprocess.run(["git", "check-ignore", "models/model.pt", "models/model.ts"], cwd=BUNDLE_ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == ["models/model.pt", "models/model.ts"], "weights must stay out of git"

    # MONAI's own downloader reads the file as written, once url and hash are filled in (here: local copies)
    sources = {"models/model.pt": trained / "models" / "model.pt", "models/model.ts": torchscript}
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for e in entries:
        e["url"] = sources[e["path"]].as_uri()
        e["hash_val"] = hashlib.md5(sources[e["path"]].read_bytes()).hexdigest()
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    # in this process (`python -m monai.bundle download_large_files` calls the same function): no start-up
    monai.bundle.download_large_files(bundle_path=str(bundle))
    for path, source in sources.items():
        assert (bundle / path).read_bytes() == source.read_bytes()

    (bundle / "models" / "model.pt").unlink()
    entries[0]["hash_val"] = "0" * 32
    (bundle / "large_files.yml").write_text(yaml.safe_dump({"large_files": entries}))
    with pytest.raises(Exception, match="(?i)md5"):
        monai.bundle.download_large_files(bundle_path=str(bundle))


def test_mlflow_tracking_records_training_and_evaluation(demo, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="mlflow is in requirements-dev.txt")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, models = tmp_path / "eval", tmp_path / "models"
    common = ["--dataset_dir", str(demo), "--ckpt_dir", str(models), "--output_dir", str(out), "--tracking",
              "mlflow", "--experiment_name", "polyp", *TINY]
    # an --output_dir given on the command line needs --save_execute_config for the config artifact (docs/README.md)
    run("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--epochs", "2", "--save_execute_config",
        str(out / "train_config.json"), *common)
    run("-m", "monai.bundle", "run", "evaluating", "--config_file", EVALUATE, *common)

    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("polyp").experiment_id])
    train = next(r for r in runs if "train_loss" in r.data.metrics)
    evaluation = next(r for r in runs if "test_dice" in r.data.metrics)
    assert train.info.status == evaluation.info.status == "FINISHED"

    state = torch.load(models / "checkpoint_final.pt", weights_only=True)["trainer"]
    losses = sorted(client.get_metric_history(train.info.run_id, "train_loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(1, state["iteration"] + 1))
    board = EventAccumulator(str(out))
    board.Reload()
    assert [m.value for m in losses] == pytest.approx([s.value for s in board.Scalars("train_loss")], rel=1e-6)
    assert len(client.get_metric_history(train.info.run_id, "val_mean_dice")) == 2
    artifacts = [a.path for a in client.list_artifacts(train.info.run_id)]
    assert artifacts == ["train_config.json"]
    assert read_json(client.download_artifacts(train.info.run_id, "train_config.json", str(tmp_path)))["epochs"] == 2
    assert evaluation.data.metrics["test_dice"] == pytest.approx(read_evaluation(out)["metrics"]["dice"], rel=1e-5)


def monailabel_bundle(demo, trained, tmp_path) -> tuple[Path, list[dict], list[dict]]:
    """A copy of the bundle with the session's model, and demo training/validation items with 0/1 PNG labels."""
    datalist = read_json(demo / "datalist.json")
    labels = tmp_path / "labels"
    labels.mkdir()
    items = []
    for item in datalist["training"][:8] + datalist["validation"][:2]:
        mask = np.moveaxis(np.atleast_3d(np.asarray(Image.open(demo / item["label"]))), -1, 0)  # (C, H, W)
        label = labels / (demo / item["label"]).with_suffix(".png").name
        Image.fromarray(binarize_mask(mask)[0].astype(np.uint8)).save(label)  # as MONAI Label's viewers save labels
        items.append({"image": str(demo / item["image"]), "label": str(label)})
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", bundle / "configs")
    shutil.copytree(BUNDLE_ROOT / "scripts", bundle / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    (bundle / "models").mkdir()
    shutil.copy(trained / "models" / "model.pt", bundle / "models" / "model.pt")
    return bundle, items[:8], items[8:]


def monailabel_overrides(bundle: Path, train: list[dict], val: list[dict]) -> str:
    """Python source of BundleTrainTask's overrides (monailabel 0.8.5), with the tiny network of the tests."""
    return textwrap.dedent(f"""
        import sys
        from monai.bundle import ConfigParser

        bundle = {str(bundle)!r}
        sys.path.insert(0, bundle)
        config = ConfigParser()
        config.read_config(bundle + "/configs/train.yaml")
        handlers = config.get("train#handlers", [])
        handlers.insert(0, {{"_target_": "CheckpointLoader", "load_path": bundle + "/models/model.pt",
                             "load_dict": {{"model": "$@network"}}, "strict": False}})
        overrides = {{"bundle_root": bundle, "train#trainer#max_epochs": 2, "train#dataset#data": {train!r},
                      "device": "cpu", "train#handlers": handlers, "validate#dataset#data": {val!r},
                      "dataset_dir": "/nonexistent", "mc_interval": 1, "image_size": 32,
                      "features": [4, 8, 8, 16, 16], "batch_size": 4, "num_workers": 0}}
    """)


def check_monailabel_training(proc, bundle: Path, trained: Path, train: list[dict], loaders: int) -> None:
    assert (proc.stdout + proc.stderr).count("Restored all variables from") == loaders  # the inserted loader ran
    before = torch.load(trained / "models" / "model.pt", weights_only=True)
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(after) == set(before) and any(not torch.equal(before[k], after[k]) for k in before)
    # the difficulty pass scored exactly the list MONAI Label gave, at both epochs
    history = (bundle / "eval" / "difficulty_history.csv").read_text().splitlines()[1:]
    assert {line.split(",")[2] for line in history} == {it["image"] for it in train} and len(history) == 2 * 8


def test_monailabel_training_contract(demo, trained, tmp_path):
    """
    What MONAI Label's ``BundleTrainTask`` (0.8.5) does to ``train.yaml``, without a server: the training and
    validation lists given as ``train#dataset#data`` / ``validate#dataset#data`` (labels as 0/1 PNGs), a
    ``CheckpointLoader`` of the current weights inserted at the head of ``train#handlers``, ``max_epochs`` set on
    the trainer, and ``monai.bundle.run`` with ``init_id=None`` (which MONAI treats as ``initialize``: a fresh run,
    which must leave ``model.pt`` in place for the inserted loader). ``dataset_dir``
    points nowhere: nothing may read the bundle's own datalist. (apps/monailabel/check_server.py does it for real.)
    """
    bundle, train, val = monailabel_bundle(demo, trained, tmp_path)
    script = tmp_path / "monailabel_train.py"
    script.write_text(monailabel_overrides(bundle, train, val) + textwrap.dedent("""
        import monai.bundle

        monai.bundle.run(run_id="run", init_id=None, final_id=None, meta_file=bundle + "/configs/metadata.json",
                         config_file=bundle + "/configs/train.yaml", **overrides)
    """))
    check_monailabel_training(run(str(script)), bundle, trained, train, loaders=1)


def test_monailabel_multi_gpu_training_contract(demo, trained, tmp_path):
    """
    MONAI Label's multi-GPU training: the overrides written into ``configs/monailabel_train.json``, then torchrun
    with ``multi_gpu_train.yaml`` on top (here 2 gloo processes on the CPU). Every replica must load the inserted
    CheckpointLoader's weights, or DDP would train from different starting points.
    """
    bundle, train, val = monailabel_bundle(demo, trained, tmp_path)
    script = tmp_path / "monailabel_export.py"
    script.write_text(monailabel_overrides(bundle, train, val) + textwrap.dedent("""
        for k, v in overrides.items():
            config.set(v, k)
        ConfigParser.export_config_file(config.config, bundle + "/configs/monailabel_train.json", indent=2)
    """))
    run(str(script))
    files = f"['{bundle}/configs/monailabel_train.json','{bundle}/configs/multi_gpu_train.yaml']"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
         "--master_port", "29527", "-m", "monai.bundle", "run", "run", "--meta_file",
         f"{bundle}/configs/metadata.json", "--config_file", files, "--logging_file",
         f"{bundle}/configs/logging.conf", "--backend", "gloo", "--device", "cpu"],
        cwd=bundle, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_monailabel_training(proc, bundle, trained, train, loaders=2)
