"""Shared fixtures: the bundle's CLI run in subprocesses, a tiny network setting, the demo set, real data."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from PIL import Image

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POLYP_SHARED_DATA", BUNDLE_ROOT.parent / "shared" / "data"))
KVASIR = SHARED_DATA / "kvasir-seg"
CVC = SHARED_DATA / "cvc-clinicdb-sample"
CHASE = SHARED_DATA / "chase-db1"
# small enough for a 2-core CPU: one epoch over the 60-image demo set takes about a second
TINY = ["--image_size", "32", "--features", "[4,8,8,16,16]", "--batch_size", "8", "--num_workers", "0"]
TINY_OVERRIDES = {"image_size": 32, "features": [4, 8, 8, 16, 16], "batch_size": 8, "num_workers": 0}
TRAIN = "configs/train.yaml"
EVALUATE = "['configs/train.yaml','configs/evaluate.yaml']"
EVAL_METRICS = ("dice", "iou", "precision", "recall")  # configs/evaluate.yaml's test_<metric>

if str(BUNDLE_ROOT) not in sys.path:  # the configs import the bundle's `scripts` package
    sys.path.insert(0, str(BUNDLE_ROOT))


def run(*args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in the bundle root, as a user would; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, *args], cwd=BUNDLE_ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_bundle(*args: str) -> None:
    """
    ``python -m monai.bundle <args>`` in this process, from the bundle root: the same commands and the same
    command-line parsing (``fire``, as ``monai/bundle/__main__.py``), without a fresh interpreter's import of MONAI
    and torch (about 7 s here). For the commands whose output a test reads from files; what a user sees on the
    terminal is tested with :func:`run`.
    """
    import fire
    from monai.bundle import scripts

    commands = {name: getattr(scripts, name) for name in ("run", "ckpt_export", "onnx_export", "verify_metadata",
                                                          "verify_net_in_out", "download_large_files")}
    cwd = os.getcwd()
    os.chdir(BUNDLE_ROOT)
    try:
        fire.Fire(commands, command=list(args))
    finally:
        os.chdir(cwd)


def load_benchmark(script: str):
    """``benchmarks/<script>`` as a module (the folder is no package), registered in ``sys.modules`` under its stem:
    a dataclass of the module resolves its annotations there."""
    name = Path(script).stem
    spec = importlib.util.spec_from_file_location(name, BUNDLE_ROOT / "benchmarks" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_benchmark(script: str, argv: list[str], monkeypatch, capsys) -> str:
    """
    What ``python benchmarks/<script> <argv>`` prints, run in this process (a fresh interpreter's import of MONAI
    costs several seconds, more than a toy run); it must end as a successful command does (``main`` returns None
    or 0, or exits 0). torch's thread count is restored after.
    """
    module = load_benchmark(script)
    monkeypatch.setattr("sys.argv", [script, *argv])
    threads = torch.get_num_threads()
    try:
        status = module.main()
    except SystemExit as e:
        status = e.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert status in (None, 0), f"benchmarks/{script} exited {status}\n{out[-3000:]}"
    return out


def last_line(proc: subprocess.CompletedProcess) -> str:
    """The last non-empty line a user sees on the terminal (stderr, where errors and logs go)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def bundle_error(config_files, **overrides) -> str:
    """
    Run a bundle workflow in this process, as ``monai.bundle run`` does, expecting it to fail on bad input, and
    return the line the bundle's exception hook shows a user (``error: <message>``). Cheaper than a subprocess;
    ``tests/test_messages.py`` checks with real commands that the hook makes this the last line.
    """
    from monai.bundle import ConfigWorkflow

    from scripts.errors import user_message

    workflow = ConfigWorkflow(config_file=[str(BUNDLE_ROOT / f) for f in config_files], workflow_type=None,
                              bundle_root=str(BUNDLE_ROOT), **overrides)
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.run()
    message = user_message(info.value)
    assert message is not None, f"not a message of the bundle's own: {info.value!r}"
    return f"error: {message}"


def needs(path: Path):
    return pytest.mark.skipif(not path.is_dir(), reason=f"real data not found at {path} (set POLYP_SHARED_DATA)")


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The synthetic demo set, prepared with the bundle's own command (in this process: its start-up is a test's)."""
    from scripts.prepare_data import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["--demo", "--output", str(out), "--num-demo", "36"]) == 0
    return out


@pytest.fixture(scope="session")
def trained(demo, tmp_path_factory) -> Path:
    """A tiny model trained for two epochs on the demo set: ``<dir>/models/model.pt`` and checkpoints."""
    out = tmp_path_factory.mktemp("trained")
    run("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--dataset_dir", str(demo),
        "--epochs", "2", "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval"), *TINY)
    return out


@pytest.fixture(scope="session")
def torchscript(trained, tmp_path_factory) -> Path:
    """``trained``'s model exported by the Model Zoo's ``ckpt_export``, as ``model.ts``."""
    ts = tmp_path_factory.mktemp("torchscript") / "model.ts"
    run_bundle("ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained / "models" / "model.pt"),
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml", "--features",
               "[4,8,8,16,16]")
    return ts


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_evaluation(folder: Path, split: str = "test") -> dict:
    """
    What ``evaluating`` of the datalist list ``split`` wrote to ``folder`` (MONAI's ``MetricsSaver``), by the names
    of ``EVAL_METRICS``: ``"metrics"``, the metric values of ``metrics.csv`` (``{"dice": 0.8, ...}``); ``"images"``,
    each image's values from ``<split>_<metric>_raw.csv`` (``{filename: {"dice": 0.7, ...}}``); ``"summary"``, the
    row ``mean`` (the mean over classes) of ``<split>_<metric>_summary.csv`` (``{"dice": {"mean": ..., ...}}``).
    """
    folder = Path(folder)
    with open(folder / "metrics.csv", newline="") as f:
        result = {"metrics": {name.removeprefix(f"{split}_"): float(value) for name, value in csv.reader(f)},
                  "images": {}, "summary": {}}
    for metric in EVAL_METRICS:
        with open(folder / f"{split}_{metric}_raw.csv", newline="") as f:
            for row in csv.DictReader(f):
                result["images"].setdefault(row["filename"], {})[metric] = float(row["mean"])
        with open(folder / f"{split}_{metric}_summary.csv", newline="") as f:
            (row,) = [r for r in csv.DictReader(f) if r["class"] == "mean"]
            result["summary"][metric] = {op: float(v) for op, v in row.items() if op != "class"}
    return result


def parse(config_files, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / f) for f in config_files])
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    return parser


def trained_network(trained, config="configs/inference.yaml") -> torch.nn.Module:
    """``network_def`` of ``config`` with the weights the session's training wrote, in eval mode."""
    net = parse([config], device="cpu", **TINY_OVERRIDES).get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    return net.eval()


@pytest.fixture(scope="session")
def balanced(demo, trained, tmp_path_factory) -> Path:
    """
    The session's trained model with the foreground logit shifted (``outc.bias[1]``) so that the median pixel of
    the demo frame sits at probability 0.5: two epochs leave the tiny model calling nearly everything polyp, and
    a mask comparison over constant masks could not fail. No training: one bias changed. ``<dir>/models/model.pt``.
    """
    root = tmp_path_factory.mktemp("balanced")
    net = trained_network(trained)
    frame = np.asarray(Image.open(demo / "images" / "demo_001.jpg").convert("RGB"))
    x = F.interpolate(torch.from_numpy(frame.copy()).permute(2, 1, 0)[None].float(), size=(32, 32), mode="area")
    with torch.no_grad():
        logits = net(x / 255.0)
    state = torch.load(trained / "models" / "model.pt", weights_only=True)
    state["outc.bias"][1] -= float((logits[:, 1] - logits[:, 0]).median())
    (root / "models").mkdir()
    torch.save(state, root / "models" / "model.pt")
    return root
