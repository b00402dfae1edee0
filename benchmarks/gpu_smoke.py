# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
The bundle on a GPU, end to end, as a user runs it: one line per check, ``ok``/``FAIL``, a figure and the seconds.

1. the CPU-sized adaptive training on the demo set, 3 epochs with AMP and a difficulty pass every epoch;
2. the same run killed after its first epoch and resumed: compared with the uninterrupted one (ε table, random
   states, trainer and the largest weight difference; bit-identical on a CPU, close on a GPU, whose bilinear
   upsampling has no deterministic backward pass);
3. the released ``model.pt`` and checkpoint loaded, without ``map_location``, by a process that sees no GPU;
4. evaluation, and MC-dropout inference (``--mc_samples 4``) on the test frames, then on the same frames as an H.264
   video (frames.csv and the overlay video decoded back);
5. ``ckpt_export`` and ``onnx_export``, and the exported files run on the CPU against ``model.pt``;
6. each network overlay (``configs/network/``, CPU-sized) trained for 2 epochs with a pass each, then MC inference;
7. ``configs/multi_gpu_train.yaml`` under torchrun on every visible GPU (NCCL), then resumed for one more epoch.

    python benchmarks/gpu_smoke.py                        # on the GPU(s), NCCL; about 3 minutes on one GPU
    python benchmarks/gpu_smoke.py --device cpu           # the same checks on the CPU, 2 gloo processes

It exits 1 if any check failed. Work files go to a temporary folder (``--work-dir`` keeps them, with each command's
log).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
NET = ["--image_size", "64", "--features", "[8,16,32,64,64]"]
PASSES = ["--mc_start", "1", "--mc_interval", "1", "--mc_samples", "4"]
TRAIN = "configs/train.yaml"
# what a process that sees no GPU loads and runs, given model.pt, a checkpoint, model.ts and model.onnx (argv 1-4)
ON_CPU = """
import sys, numpy as np, onnxruntime, torch
from scripts.networks import DropoutUNet
assert not torch.cuda.is_available()
model, checkpoint = (torch.load(p, weights_only=True) for p in sys.argv[1:3])  # no map_location, as ckpt_export
tensors = [*model.values(), *checkpoint["model"].values()]
assert all(t.device.type == "cpu" for t in tensors), "a released tensor is not on the CPU"
net = DropoutUNet(3, 2, features=[8, 16, 32, 64, 64]).eval()
net.load_state_dict(model)
x = torch.rand(1, 3, 224, 224)
with torch.no_grad():
    ref = net(x)
    ts = torch.jit.load(sys.argv[3], map_location="cpu")(x)
session = onnxruntime.InferenceSession(sys.argv[4], providers=["CPUExecutionProvider"])
onnx = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
print(f"{len(tensors)} CPU tensors; |TorchScript - model.pt| {(ts - ref).abs().max():.1e}, "
      f"|ONNX - model.pt| {(onnx - ref).abs().max():.1e}")
assert (ts - ref).abs().max() < 1e-4 and (onnx - ref).abs().max() < 1e-4
"""


class Smoke:
    """Runs the checks in order, each a bundle command or two, and prints one line per check."""

    def __init__(self, work: Path, device: str, nproc: int) -> None:
        self.work, self.device, self.nproc, self.failed = work, device, nproc, []
        self.common = ["--dataset_dir", str(work / "demo"), "--device", device, *NET, "--batch_size", "8"]

    def command(self, args: list[str], log: str, env: dict | None = None) -> str:
        with open(self.work / f"{log}.log", "w") as f:
            proc = subprocess.run(args, cwd=BUNDLE_ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        output = (self.work / f"{log}.log").read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:6])} ... exited {proc.returncode}: {output.strip()[-600:]}")
        return output

    def bundle(self, *args: str, log: str) -> str:
        return self.command([sys.executable, "-m", "monai.bundle", *args], log)

    def training(self, name: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, *self.common,
                "--epochs", "3", "--ckpt_dir", str(self.work / name), "--output_dir", str(self.work / f"{name}_eval"),
                *PASSES, *extra]

    def check(self, name: str, step) -> None:
        began = time.perf_counter()
        try:
            detail, ok = step(), True
        except Exception as e:  # a check that fails is reported and the next one runs
            detail, ok = f"{type(e).__name__}: {e}", False
            self.failed.append(name)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail} ({time.perf_counter() - began:.0f} s)", flush=True)

    # -- the checks ----------------------------------------------------------------------------------------------
    def environment(self) -> str:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible (pass --device cpu to run the checks on the CPU)")
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        self.command([sys.executable, "-m", "scripts.prepare_data", "--demo", "--output", str(self.work / "demo"),
                      "--num-demo", "36"], "prepare")
        return f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs {gpus or 'none'}; demo set prepared"

    def train(self) -> str:
        self.command(self.training("straight"), "train")
        state = torch.load(self.work / "straight" / "checkpoint_final.pt", map_location="cpu", weights_only=True)
        amp = state["grad_scaler"]
        if self.device.startswith("cuda") and not amp:
            raise RuntimeError("AMP was off: the checkpoint holds no loss scale")
        return (f"{state['trainer']['iteration']} iterations, {state['epsilon_table']['num_passes']} difficulty "
                f"passes, AMP loss scale {amp.get('scale', 'none (no AMP)')}")

    def kill_and_resume(self) -> str:
        victim = subprocess.Popen(self.training("killed"), cwd=BUNDLE_ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        while not (self.work / "killed" / "checkpoint_epoch=1.pt").exists() and victim.poll() is None:
            time.sleep(0.01)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        if (self.work / "killed" / "checkpoint_final.pt").exists():
            raise RuntimeError("the run finished before it was killed")
        self.command(self.training("killed", "--resume", "True"), "resume")
        a, b = (torch.load(self.work / n / "checkpoint_final.pt", map_location="cpu", weights_only=True)
                for n in ("straight", "killed"))
        if a["trainer"] != b["trainer"] or a["epsilon_table"]["num_passes"] != b["epsilon_table"]["num_passes"]:
            raise RuntimeError(f"the resumed run stopped elsewhere: {b['trainer']} against {a['trainer']}")
        difference = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"])
        exact = difference == 0 and a["epsilon_table"] == b["epsilon_table"]
        if self.device == "cpu" and not (exact and a["random_states"] == b["random_states"]):
            raise RuntimeError(f"not bit-identical on the CPU: max |dw| {difference:.2e}")
        return (f"bit-identical: {'yes' if exact else 'no'}; max |dw| {difference:.2e}; same eps table: "
                f"{a['epsilon_table'] == b['epsilon_table']}; same random states: "
                f"{a['random_states'] == b['random_states']}")

    def evaluate(self) -> str:
        self.bundle("run", "evaluating", "--config_file", f"['{TRAIN}','configs/evaluate.yaml']", *self.common,
                    "--ckpt_dir", str(self.work / "straight"), "--output_dir", str(self.work / "report"),
                    log="evaluate")
        metrics = dict(line.split(",") for line in (self.work / "report" / "metrics.csv").read_text().split())
        return f"test Dice {float(metrics['test_dice']):.3f}, IoU {float(metrics['test_iou']):.3f}"

    def mc_inference(self) -> str:
        datalist = json.loads((self.work / "demo" / "datalist.json").read_text())
        test = [self.work / "demo" / e["image"] for e in datalist["test"]]
        frames = self.work / "frames"
        frames.mkdir(exist_ok=True)
        for image in test:
            shutil.copy(image, frames / image.name)
        out = self.work / "inferred"
        self.bundle("run", "--config_file", "configs/inference.yaml", "--input_dir", str(frames), "--output_dir",
                    str(out), "--ckpt_dir", str(self.work / "straight"), "--device", self.device, *NET,
                    "--mc_samples", "4", log="inference")
        masks, maps = len(list(out.glob("*_mask.png"))), len(list(out.glob("*_mutual_information.nii.gz")))
        if masks != len(test) or maps != len(test):
            raise RuntimeError(f"{masks} masks and {maps} MI maps for {len(test)} frames")
        return f"{masks} masks with probability, variance, entropy and MI maps"

    def video_inference(self) -> str:
        import av
        import numpy as np
        from PIL import Image

        frames = sorted((self.work / "frames").iterdir())  # mc_inference's, all of the demo's one size
        (self.work / "video").mkdir(exist_ok=True)
        video = self.work / "video" / "clip.mp4"
        with av.open(str(video), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height = Image.open(frames[0]).size
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                rgb = np.asarray(Image.open(frame).convert("RGB"))
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode())
        out = self.work / "video_inferred"
        self.bundle("run", "--config_file", "configs/inference.yaml", "--input", str(video), "--output_dir", str(out),
                    "--ckpt_dir", str(self.work / "straight"), "--device", self.device, *NET, "--mc_samples", "4",
                    log="video_inference")
        rows = (out / "clip" / "frames.csv").read_text().splitlines()[1:]
        with av.open(str(out / "clip" / "overlay.mp4")) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        if len(rows) != len(frames) or decoded != len(frames):
            raise RuntimeError(f"{len(rows)} rows of frames.csv and {decoded} overlay frames for {len(frames)} frames")
        return f"{len(rows)} frames of an H.264 clip: frames.csv with MI and the overlay video"

    def export(self) -> str:
        for verb, name in (("ckpt_export", "model.ts"), ("onnx_export", "model.onnx")):
            self.bundle(verb, "network_def", "--filepath", str(self.work / name), "--ckpt_file",
                        str(self.work / "straight" / "model.pt"), "--meta_file", "configs/metadata.json",
                        "--config_file", "configs/inference.yaml", *NET[2:], "--device", self.device, log=verb)
        # a process that sees no GPU: what a CPU machine gets from a GPU run
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(BUNDLE_ROOT)}
        files = [self.work / "straight" / n for n in ("model.pt", "checkpoint_final.pt")]
        output = self.command([sys.executable, "-c", ON_CPU, *map(str, files), str(self.work / "model.ts"),
                               str(self.work / "model.onnx")], "on_cpu", env=env)
        return output.strip().splitlines()[-1]

    def networks(self) -> str:
        """Each network overlay (configs/network/): 2 epochs with a pass each (AMP on a GPU), then MC inference."""
        frames = self.work / "frames"  # mc_inference's frames
        done = []
        for overlay in sorted((BUNDLE_ROOT / "configs" / "network").glob("*.yaml")):
            name, stack = overlay.stem, f"configs/network/{overlay.name}"
            self.command([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                          f"['{TRAIN}','{stack}']", *self.common[:4], "--image_size", "64", "--batch_size", "8",
                          "--epochs", "2", *PASSES,
                          "--ckpt_dir", str(self.work / name), "--output_dir", str(self.work / f"{name}_eval")],
                         f"network_{name}")
            self.bundle("run", "--config_file", f"['configs/inference.yaml','{stack}']", "--input_dir", str(frames),
                        "--output_dir", str(self.work / f"{name}_inferred"), "--ckpt_dir", str(self.work / name),
                        "--device", self.device, "--image_size", "64", "--mc_samples", "4",
                        log=f"network_{name}_inference")
            state = torch.load(self.work / name / "checkpoint_final.pt", map_location="cpu", weights_only=True)
            maps = len(list((self.work / f"{name}_inferred").glob("*_mutual_information.nii.gz")))
            if state["epsilon_table"]["num_passes"] != 2 or maps != len(list(frames.iterdir())):
                raise RuntimeError(f"{name}: {state['epsilon_table']['num_passes']} passes, {maps} MI maps")
            done.append(name)
        return f"{len(done)} overlays trained with 2 passes and inferred with MC dropout: {', '.join(done)}"

    def multi_gpu(self) -> str:
        def launch(*extra: str) -> None:
            self.command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(self.nproc), "-m", "monai.bundle", "run", "training", "--config_file",
                          f"['{TRAIN}','configs/multi_gpu_train.yaml']", *self.common[:2], *NET, "--batch_size", "8",
                          "--ckpt_dir", str(self.work / "ddp"), "--output_dir", str(self.work / "ddp_eval"), *PASSES,
                          *(["--backend", "gloo", "--device", "cpu"] if self.device == "cpu" else []), *extra],
                         "multi_gpu" + "_resume" * ("--resume" in extra))

        launch("--epochs", "2")
        launch("--epochs", "3", "--resume", "True")
        state = torch.load(self.work / "ddp" / "checkpoint_final.pt", map_location="cpu", weights_only=True)
        ranks = len(state["random_states"]["ranks"])
        if ranks != self.nproc or state["epsilon_table"]["num_passes"] != 3:
            raise RuntimeError(f"{ranks} random states and {state['epsilon_table']['num_passes']} passes")
        backend = "gloo" if self.device == "cpu" else "NCCL"
        return f"{self.nproc} process(es), {backend}: 2 epochs, then resumed to 3, each process's random state kept"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0", help="cuda:0 (default) or cpu")
    p.add_argument("--nproc", type=int, help="processes of the multi-GPU run (default: every visible GPU; CPU: 2)")
    p.add_argument("--work-dir", type=Path, help="keep the runs and logs here (default: a temporary folder)")
    args = p.parse_args()
    nproc = args.nproc or (2 if args.device == "cpu" else max(torch.cuda.device_count(), 1))
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        smoke = Smoke(work.resolve(), args.device, nproc)
        began = time.perf_counter()
        smoke.check("environment", smoke.environment)
        if not smoke.failed:
            for name in ("train", "kill_and_resume", "evaluate", "mc_inference", "video_inference", "export",
                         "networks", "multi_gpu"):
                smoke.check(name.replace("_", " "), getattr(smoke, name))
        print(f"{'FAILED: ' + ', '.join(smoke.failed) if smoke.failed else 'all checks passed'} "
              f"in {time.perf_counter() - began:.0f} s", flush=True)
    sys.exit(1 if smoke.failed else 0)


if __name__ == "__main__":
    main()
