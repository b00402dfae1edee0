"""
The method on any network (configs/network/*.yaml, a user's own class): adaptive training with a pass, resume,
evaluation and MC inference per overlay, in this process through MONAI's ConfigWorkflow; the one sampler (the
encoder-once split exact against full passes); the checks before the first epoch, one per refusal; BatchNorm
buffers bit-identical across a pass for every overlay.
"""

from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, bundle_error, parse, read_json, run
from monai.bundle import ConfigWorkflow, ckpt_export
from torch import nn

from scripts.errors import InputError
from scripts.uncertainty import check_mc_network, encoder_split, mc_foreground_samples, mc_foreground_samples_naive

# each overlay at its smallest: widths a CPU trains in a second, 32 px frames (SwinUNETR: 64, for its 1/32 stage's
# instance norm needs more than one pixel)
OVERLAYS = {
    "unet": [4, 8, 16, 32],
    "basic_unet": [4, 4, 8, 16, 32, 4],
    "attention_unet": [4, 8, 16, 32],
    "flexible_unet": [16, 8, 8, 8, 4],
    "segresnet": 8,
    "swin_unetr": 12,
}
IMAGE_SIZE = {"swin_unetr": 64}
BATCH_NORM = {"attention_unet", "flexible_unet"}
NOT_SCRIPTABLE = {"swin_unetr"}
RESUMED = {"flexible_unet", "unet"}
SMALL = {"image_size": 32, "batch_size": 8, "num_workers": 0, "mc_samples": 3, "mc_start": 1, "mc_interval": 1}


class TinySegNet(nn.Module):
    """A user's own network, as a test module defines it: two convolutions, dropout between them."""

    def __init__(self, width: int = 8, p: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Dropout2d(p), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _configs(*files: str) -> list[str]:
    return [str(BUNDLE_ROOT / f) for f in files]


def _run_workflow(files, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(config_file=_configs(*files), workflow_type=None, bundle_root=str(BUNDLE_ROOT),
                              **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _small(name: str) -> dict:
    return {**SMALL, "features": OVERLAYS[name], "image_size": IMAGE_SIZE.get(name, 32)}


def _train(name: str, demo: Path, out: Path, **extra) -> ConfigWorkflow:
    # after an epoch or two some of these tiny networks predict no polyp on any demo frame, which gives every image
    # D = 0 under the default's empty rule: the whole frame's mean entropy tells the images apart
    return _run_workflow(["configs/train.yaml", f"configs/network/{name}.yaml"], dataset_dir=str(demo),
                         ckpt_dir=str(out / "models"), output_dir=str(out / "eval"),
                         **{"epochs": 2, "difficulty#scorer#empty": "image_mean", **_small(name), **extra})


def _resume_matches(name: str, demo: Path, out: Path, tmp_path: Path) -> None:
    """A copy of the run as it was after epoch 1's checkpoint, resumed, ends bit-identical with the run."""
    (tmp_path / "models").mkdir()
    for kept in ("checkpoint_epoch=1.pt", "run.json"):
        shutil.copy(out / "models" / kept, tmp_path / "models")
    _train(name, demo, tmp_path, resume=True)
    a = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    b = torch.load(tmp_path / "models" / "checkpoint_final.pt", weights_only=True)
    assert a["epsilon_table"] == b["epsilon_table"] and a["epsilon_table"]["num_passes"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.fixture(scope="module")
def overlay_runs(demo, tmp_path_factory) -> dict[str, Path]:
    """Each overlay trained adaptively for 2 epochs with a pass at the start of each, on the demo set."""
    runs = {}
    for name in OVERLAYS:
        runs[name] = tmp_path_factory.mktemp(name)
        _train(name, demo, runs[name])
    return runs


@pytest.mark.parametrize("name", OVERLAYS)
def test_an_overlay_trains_adaptively_resumes_evaluates_and_infers_with_mc_dropout(name, overlay_runs, demo,
                                                                                  tmp_path):
    out = overlay_runs[name]
    n_train = len(read_json(demo / "datalist.json")["training"])
    with open(out / "eval" / "difficulty_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * n_train and {r["pass"] for r in rows} == {"1", "2"}
    eps = [float(r["eps"]) for r in rows if r["pass"] == "2"]
    assert 0.0 <= min(eps) < max(eps) <= 0.5  # the pass told the images apart
    with open(out / "eval" / "label_audit.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == n_train  # the label audit, from the same samples
    trained_class = read_json(out / "models" / "run.json")["fingerprint"]["network"].split("(")[0]
    built = parse(["configs/train.yaml", f"configs/network/{name}.yaml"], features=OVERLAYS[name])
    assert trained_class == type(built.get_parsed_content("network_def")).__name__

    # a run killed after epoch 1's checkpoint, resumed: it ends where the uninterrupted run did, eps table included
    # (for a network with a split and BatchNorm, and one with full passes and instance norm: the rest alike)
    if name in RESUMED:
        _resume_matches(name, demo, out, tmp_path)

    evaluation = tmp_path / "evaluation"
    _run_workflow(["configs/train.yaml", "configs/evaluate.yaml", f"configs/network/{name}.yaml"],
                  dataset_dir=str(demo), ckpt_dir=str(out / "models"), output_dir=str(evaluation), **_small(name))
    with open(evaluation / "metrics.csv", newline="") as f:
        metrics = {k: float(v) for k, v in csv.reader(f)}
    assert 0.0 <= metrics["test_dice"] <= 1.0  # two epochs may not find a polyp yet: the values are not the point
    with open(evaluation / "test_dice_raw.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(read_json(demo / "datalist.json")["test"])

    frames = tmp_path / "frames"
    frames.mkdir()
    for image in sorted((demo / "images").iterdir())[:2]:
        shutil.copy(image, frames)
    _run_workflow(["configs/inference.yaml", f"configs/network/{name}.yaml"], input_dir=str(frames),
                  output_dir=str(tmp_path / "inferred"), ckpt_dir=str(out / "models"),
                  **{k: _small(name)[k] for k in ("features", "image_size", "batch_size", "num_workers", "mc_samples")})
    with open(tmp_path / "inferred" / "uncertainty.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and all(np.isfinite(float(r["mean_entropy"])) for r in table)
    maps = sorted((tmp_path / "inferred").rglob("*mutual_information.nii.gz"))
    assert len(maps) == 2
    assert max(float(np.asarray(nib.load(m).dataobj).max()) for m in maps) > 0  # the dropout samples differ

    # the Model Zoo's TorchScript export, in this process; SwinUNETR does not script (ONNX export: docs/README.md)
    ts = tmp_path / "model.ts"
    settings = {k: _small(name)[k] for k in ("features", "image_size")}

    def export():
        ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(out / "models" / "model.pt"),
                    meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"), bundle_root=str(BUNDLE_ROOT),
                    config_file=_configs("configs/inference.yaml", f"configs/network/{name}.yaml"), **settings)

    if name in NOT_SCRIPTABLE:
        with pytest.raises(RuntimeError):
            export()
        return
    export()
    net = parse(["configs/inference.yaml", f"configs/network/{name}.yaml"], **settings).get_parsed_content(
        "network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 3, settings["image_size"], settings["image_size"])
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net.eval()(x))


def test_the_issue_command_and_a_users_own_class_train_with_a_pass(demo, tmp_path):
    """The command that failed at the first pass, as a user types it; then a class from this test module."""
    unet = ("{'_target_': 'monai.networks.nets.UNet', 'spatial_dims': 2, 'in_channels': 3, 'out_channels': 2, "
            "'channels': [8,16,32,64], 'strides': [2,2,2], 'dropout': 0.2}")
    common = ["--dataset_dir", str(demo), "--num_workers", "0", "--mc_start", "1", "--mc_interval", "1"]
    run("-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", "--image_size", "64",
        "--batch_size", "8", "--epochs", "2", "--mc_samples", "4", "--network_def", unet, *common,
        "--ckpt_dir", str(tmp_path / "unet"), "--output_dir", str(tmp_path / "unet_eval"))
    table = torch.load(tmp_path / "unet" / "checkpoint_final.pt", weights_only=True)["epsilon_table"]
    assert table["num_passes"] == 2
    # a user's class: importable from the tests folder (this module); a functional-dropout variant is refused
    user = _run_workflow(["configs/train.yaml"], network_def={"_target_": "test_any_network.TinySegNet"},
                         dataset_dir=str(demo), ckpt_dir=str(tmp_path / "user"),
                         output_dir=str(tmp_path / "user_eval"), epochs=1, **SMALL)
    assert user.parser.get_parsed_content("epsilon_table").num_passes == 1
    assert "TinySegNet" in read_json(tmp_path / "user" / "run.json")["fingerprint"]["network"]


# ---------------------------------------------------------------- the sampler


def test_the_flexible_unet_split_equals_full_passes_with_the_same_seed():
    net = parse(["configs/train.yaml", "configs/network/flexible_unet.yaml"],
                features=OVERLAYS["flexible_unet"]).get_parsed_content("network_def").eval()
    encode, decode = encoder_split(net)
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(7)
    fast = mc_foreground_samples(net, x, 4, chunk_size=3)  # a chunk of B pairs: the draws of B-image passes
    torch.manual_seed(7)
    full = mc_foreground_samples_naive(net, x, 4)
    assert torch.equal(fast, full)
    assert fast.std(0).max() > 0  # samples differ
    # the encoder runs no dropout: encoding twice in sampling mode gives the same features
    from scripts.networks import mc_dropout

    with mc_dropout(net), torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(encode(x), encode(x)))
    # another chunking draws other masks; shapes and ranges hold
    chunked = mc_foreground_samples(net, x, 4, chunk_size=5)
    assert chunked.shape == (4, 3, 32, 32) and 0 <= chunked.min() and chunked.max() <= 1
    assert encoder_split(parse(["configs/train.yaml", "configs/network/unet.yaml"], features=OVERLAYS["unet"])
                         .get_parsed_content("network_def")) is None  # dropout in every block: full passes


def test_full_passes_in_chunks_draw_what_sequential_passes_draw():
    net = parse(["configs/train.yaml", "configs/network/attention_unet.yaml"],
                features=OVERLAYS["attention_unet"]).get_parsed_content("network_def").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    batched = mc_foreground_samples(net, x, 5, chunk_size=2)
    torch.manual_seed(3)
    sequential = mc_foreground_samples_naive(net, x, 5)
    assert torch.equal(batched, sequential)
    torch.manual_seed(3)
    assert torch.equal(mc_foreground_samples(net, x, 5, chunk_size=2), batched)  # seeded: reproducible


@pytest.mark.parametrize("name", OVERLAYS)
def test_a_pass_leaves_every_buffer_bit_identical(name, overlay_runs, demo):
    net = parse(["configs/train.yaml", f"configs/network/{name}.yaml"],
                features=OVERLAYS[name]).get_parsed_content("network_def")
    net.load_state_dict(torch.load(overlay_runs[name] / "models" / "model.pt", weights_only=True))
    net.train()  # as the trainer leaves it when a pass starts
    before = {k: v.clone() for k, v in net.state_dict().items()}
    # BatchNorm where the class uses it by default; the others normalise per image (instance, group, layer norm)
    assert any(k.endswith("running_mean") for k in before) == (name in BATCH_NORM)
    size = IMAGE_SIZE.get(name, 32)
    samples = mc_foreground_samples(net, torch.rand(4, 3, size, size), 3)
    assert samples.std(0).max() > 0
    after = net.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{name}: {key} changed"
    assert all(m.training for m in net.modules())  # modes restored


# ---------------------------------------------------------------- checks before the first epoch


class _FunctionalDropout(TinySegNet):
    """Its Dropout2d runs on a side branch; the output's dropout is functional, tied to the top module's mode,
    which the sampler keeps in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.side = None

    def forward(self, x):
        h = self.body[:3](x)
        self.side = self.body[3](h).mean()
        return self.head(self.body[4:](nn.functional.dropout(h, 0.3, training=self.training)))


class _AlwaysDropout(TinySegNet):
    def forward(self, x):
        return self.head(nn.functional.dropout(self.body(x), 0.3, training=True))


class _UnusedDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 2, 1), nn.Dropout(0.5)

    def forward(self, x):
        return self.conv(x)


class _StatsInEval(TinySegNet):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1  # a buffer a forward pass changes
        return super().forward(x)


REFUSALS = {
    "no_dropout": ({"_target_": "monai.networks.nets.SegResNet", "spatial_dims": 2, "in_channels": 3,
                    "out_channels": 2, "init_filters": 8},
                   "error: SegResNet has no dropout layer with p > 0, which Monte Carlo dropout needs: set its "
                   "argument dropout_prob > 0 (the bundle's --dropout, which its overlay in configs/network/ maps to "
                   "dropout_prob)."),
    "never_fires": ({"_target_": "test_any_network._UnusedDropout"},
                    "error: _UnusedDropout's dropout layers (drop) never run in its forward, so Monte Carlo dropout "
                    "would sample nothing: _UnusedDropout has no dropout argument, so add a torch.nn.Dropout layer "
                    "to it on layers that forward uses."),
    "identical": ({"_target_": "test_any_network._FunctionalDropout"},
                  "error: _FunctionalDropout gives identical outputs in two Monte Carlo dropout passes although it "
                  "has dropout with p > 0, so its dropout is not the modules the sampler switches on: use "
                  "torch.nn.Dropout modules in forward (not F.dropout with a fixed training flag)."),
    "eval_differs": ({"_target_": "test_any_network._AlwaysDropout"},
                     "error: _AlwaysDropout gives two different outputs for one input in eval mode, so dropout runs "
                     "outside the sampler's control (e.g. F.dropout(x, training=True)): use torch.nn.Dropout "
                     "modules, which eval mode switches off."),
    "drop_path_only": ({"_target_": "monai.networks.nets.SwinUNETR", "spatial_dims": 2, "in_channels": 3,
                        "out_channels": 2, "feature_size": 12, "dropout_path_rate": 0.2},
                       "error: SwinUNETR has stochastic depth (DropPath) but no dropout with p > 0, and Monte Carlo "
                       "dropout samples dropout only: set its argument drop_rate > 0 (the bundle's --dropout, which "
                       "its overlay in configs/network/ maps to drop_rate)."),
    "list_output": ({"_target_": "monai.networks.nets.BasicUNetPlusPlus", "spatial_dims": 2, "in_channels": 3,
                     "out_channels": 2, "features": [4, 4, 8, 16, 32, 4], "dropout": 0.2},
                    "error: BasicUNetPlusPlus returns a list of 1 outputs, not one (B, 2, H, W) tensor "
                    "(BasicUNetPlusPlus returns a list even without deep supervision), and the bundle does not "
                    "choose among them: wrap it in a module whose forward returns its final output."),
    "wrong_channels": ({"_target_": "monai.networks.nets.UNet", "spatial_dims": 2, "in_channels": 3,
                        "out_channels": 1, "channels": [4, 8], "strides": [2], "dropout": 0.2},
                       "error: UNet maps an input of shape (1, 3, 32, 32) to (1, 1, 32, 32), but the bundle needs "
                       "(1, 2, 32, 32) background/foreground logits: set its output channels to 2 and check that "
                       "--image_size is divisible by its total downsampling."),
    "input_too_small": ({"_target_": "monai.networks.nets.SwinUNETR", "spatial_dims": 2, "in_channels": 3,
                         "out_channels": 2, "feature_size": 12, "drop_rate": 0.2},
                        "error: SwinUNETR fails on an input of shape (1, 3, 32, 32) (Expected more than 1 spatial "
                        "element when training, got input size torch.Size([1, 192, 1, 1])): check --image_size "
                        "against the network's downsampling (and its in_channels: the bundle feeds RGB)."),
    "buffers_change": ({"_target_": "test_any_network._StatsInEval"},
                       "error: a Monte Carlo dropout pass of _StatsInEval changed its buffers (calls), which must "
                       "stay as trained: its normalisation layers must use their running statistics in eval mode "
                       "(BatchNorm with track_running_stats=True, InstanceNorm)."),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_network_the_pass_cannot_use_is_refused_before_the_first_epoch(case, demo, tmp_path):
    network_def, expected = REFUSALS[case]
    assert bundle_error(["configs/train.yaml"], network_def=network_def, dataset_dir=str(demo),
                        ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"), epochs=1, **SMALL) == expected
    assert not (tmp_path / "m").exists()  # refused before any file was written


def test_checks_warn_of_element_wise_dropout_before_the_output_layer_and_keep_the_random_stream():
    from scripts.networks import DropoutUNet

    nets = DropoutUNet(features=[4, 8, 8, 16, 16]), TinySegNet()  # Dropout2d, a convolution before the output
    state = torch.random.get_rng_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for net in nets:
            check_mc_network(net, 32)
    messages = [str(w.message) for w in caught if "output layer" in str(w.message)]
    assert messages == ["DropoutUNet applies element-wise dropout directly before its output layer, so each "
                        "pixel's logit gets independent noise in every Monte Carlo sample: its uncertainty maps are "
                        "speckled rather than spatially coherent."]
    assert torch.equal(torch.random.get_rng_state(), state)
    # a fixed-shape loss runs no pass: only the output is checked
    assert isinstance(check_mc_network(nn.Sequential(nn.Conv2d(3, 2, 1)), 32, mc=False), nn.Module)
    with pytest.raises(InputError, match="no dropout layer"):
        check_mc_network(nn.Sequential(nn.Conv2d(3, 2, 1)), 32)


def test_with_dropout_passes_dropout_as_the_classs_own_argument():
    from scripts.networks import with_dropout

    net = with_dropout("monai.networks.nets.SegResNet", 0.3, spatial_dims=2, in_channels=3, out_channels=2)
    assert [m.p for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)] == [0.3]  # dropout_prob
    with pytest.raises(InputError, match="Conv2d has no dropout argument for network_def#dropout"):
        with_dropout(nn.Conv2d, 0.3, in_channels=3, out_channels=2, kernel_size=1)
    with pytest.raises(InputError, match="network_def#network must name a torch.nn.Module class"):
        with_dropout("monai.networks.nets.NoSuchNet", 0.3)
    with pytest.raises(InputError, match="--dropout must be a number in"):
        with_dropout("monai.networks.nets.SegResNet", 1.5)


def test_evaluation_names_the_overlay_a_model_was_trained_with(overlay_runs, demo, tmp_path):
    message = bundle_error(["configs/train.yaml", "configs/evaluate.yaml"], dataset_dir=str(demo),
                           ckpt_dir=str(overlay_runs["segresnet"] / "models"), output_dir=str(tmp_path),
                           **{k: v for k, v in _small("segresnet").items() if k != "features"})
    assert message.endswith("was trained as SegResNet (recorded in "
                            f"{overlay_runs['segresnet'] / 'models' / 'run.json'}) but this command builds "
                            "DropoutUNet: add configs/network/segresnet.yaml last to --config_file (and "
                            "configs/vessel/refiner.yaml for a refined vessel model).")
