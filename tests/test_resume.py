"""Runs a user can trust: files written whole, a run's identity in its checkpoints, resume of that run only."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from types import SimpleNamespace

import ignite.distributed as idist
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_OVERRIDES, TRAIN, bundle_error, parse, read_json
from ignite.engine import Engine
from monai.transforms import Compose, RandFlipd

from scripts.checkpoints import AtomicCheckpointSaver
from scripts.errors import InputError
from scripts.resume import (CosineSchedule, RandomStates, TrainerGradScaler, check_trained_model, check_window,
                            seed_process)


@pytest.mark.parametrize("what,name", [("model", "model.pt"), ("checkpoint", "checkpoint_final.pt"),
                                       ("history", "difficulty_history.csv")])
def test_a_kill_while_saving_leaves_the_previous_file_whole(what, name, tmp_path):
    proc = subprocess.run([sys.executable, str(BUNDLE_ROOT / "tests" / "crash_while_saving.py"), what, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]  # it died half-way through the second write
    if what == "history":
        rows = (tmp_path / name).read_text().splitlines()
        assert rows[0].startswith("pass,epoch,image") and len(rows) == 4 and all(r.startswith("1,1,") for r in rows[1:])
    else:
        state = torch.load(tmp_path / name, weights_only=True)
        saved = state.get("model", state)
        assert saved["weight"].shape == (2, 3) and not torch.all(saved["weight"] == 7.0)  # the first file's weights


def _identity(tmp_path, demo, **changes):
    parser = parse([TRAIN], dataset_dir=str(demo), ckpt_dir=str(tmp_path), device="cpu", features=[4, 8, 8, 16, 16],
                   **changes)
    return parser.get_parsed_content("run_identity")


def test_run_identity_names_what_differs(demo, tmp_path):
    a = _identity(tmp_path, demo)
    assert a.differences(_identity(tmp_path, demo).fingerprint) == []
    b = _identity(tmp_path, demo, dropout=0.25, mc_interval=5)
    differences = a.differences(b.fingerprint)
    assert [d.split(":")[0] for d in differences] == ["dropout", "mc_interval", "network"]
    assert "dropout=[0.25, 0.25]" in differences[2] and "dropout=[0.5, 0.5]" in differences[2]
    polydice = parse([TRAIN, "configs/loss/polydice1.yaml"], dataset_dir=str(demo), ckpt_dir=str(tmp_path),
                     features=[4, 8, 8, 16, 16], eps=0.3).get_parsed_content("run_identity")
    assert "loss" in {d.split(":")[0] for d in a.differences(polydice.fingerprint)}
    with pytest.raises(InputError, match=r"checkpoint X belongs to another run \(dropout: 0.25 there, 0.5 here; "
                                         r"mc_interval: 5 there, 10 here"):
        a.load_state_dict(b.state_dict(), source="checkpoint X")


def test_resume_refuses_another_runs_checkpoint_and_a_fresh_run_keeps_it(demo, trained, tmp_path):
    """Two runs in one folder: resume refuses the other's checkpoint; a fresh run moves it aside, whole."""
    import shutil

    shutil.copytree(trained / "models", tmp_path / "models")
    best = (tmp_path / "models" / "model.pt").read_bytes()
    common = dict(dataset_dir=str(demo), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"),
                  image_size=32, features=[4, 8, 8, 16, 16], batch_size=8, num_workers=0)
    line = bundle_error([TRAIN], resume=True, epochs=3, **{**common, "batch_size": 4})
    assert line.startswith(f"error: checkpoint {tmp_path / 'models'}/checkpoint_final.pt belongs to another run "
                           "(batch_size: 8 there, 4 here)")
    assert (tmp_path / "models" / "model.pt").read_bytes() == best
    identity = _identity(tmp_path / "models", demo, batch_size=4)
    identity.start(resume=False)  # what a fresh training does first
    (moved,) = (tmp_path / "models" / "previous").iterdir()
    assert (moved / "model.pt").read_bytes() == best and (moved / "checkpoint_final.pt").is_file()
    # model.pt is copied (a CheckpointLoader, e.g. MONAI Label's, may fine-tune from it), the rest moved
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt", "previous", "run.json"]
    assert read_json(tmp_path / "models" / "run.json")["run_id"] == identity.run_id != moved.name.split("-")[1]


def test_evaluation_and_inference_name_the_overrides_a_model_was_trained_with(trained, demo, tmp_path):
    net = parse(["configs/inference.yaml"], device="cpu").get_parsed_content("network_def")  # full width
    path = trained / "models" / "model.pt"
    with pytest.raises(InputError) as info:
        check_trained_model(path, net, image_size=224, features=[64, 128, 256, 512, 512], dropout=0.5)
    assert str(info.value) == (f'{path} was trained with --image_size 32 --features "[4,8,8,16,16]" (recorded in '
                               f'{path.parent / "run.json"}) but this command has --image_size 224 --features '
                               f'"[64,128,256,512,512]": pass --image_size 32 --features "[4,8,8,16,16]".')
    # another network class is named first, with the overlay that builds the right one
    from scripts.networks import FullResolutionUNet

    with pytest.raises(InputError) as info:
        check_trained_model(path, FullResolutionUNet(features=[4, 8]), features=[4, 8])
    assert str(info.value) == (f"{path} was trained as DropoutUNet (recorded in {path.parent / 'run.json'}) but this "
                               "command builds FullResolutionUNet: leave the network overlay out or add "
                               "configs/vessel/unet.yaml last to --config_file (and configs/vessel/refiner.yaml for a "
                               "refined vessel model).")
    # without run.json (a model.pt copied on its own) the tensor shapes still tell
    alone = tmp_path / "model.pt"
    alone.write_bytes(path.read_bytes())
    with pytest.raises(InputError, match=r"does not fit network_def: inc.conv_0.conv.weight is \(4, 3, 3, 3\) in "
                                         r"the file but \(64, 3, 3, 3\) here; pass the --features it was trained"):
        check_trained_model(alone, net)


def test_a_resumed_best_model_saver_keeps_the_better_model(tmp_path):
    """The key-metric ranking travels in the resume checkpoint: a worse score after a resume keeps model.pt."""
    from ignite.engine import Engine, Events

    from scripts.checkpoints import AtomicCheckpointSaver

    def validation(net, scores):
        engine = Engine(lambda e, b: None)
        scores = iter(scores)

        @engine.on(Events.EPOCH_COMPLETED)
        def score(e):
            e.state.metrics, e.state.key_metric_name = {"val_mean_dice": next(scores)}, "val_mean_dice"

        saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True,
                                      key_metric_filename="model.pt")
        saver.attach(engine)
        return engine, saver

    net = torch.nn.Linear(3, 2)
    engine, saver = validation(net, [0.8])
    engine.run([0], max_epochs=1)
    state = saver.state_dict()
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.nn.init.constant_(net.weight, 7.0)
    engine, saver = validation(net, [0.6, 0.9])  # the resumed run validates worse first, then better
    saver.load_state_dict(state)
    engine.run([0], max_epochs=1)
    torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=True), best)
    engine.run([0], max_epochs=2)
    assert torch.all(torch.load(tmp_path / "model.pt", weights_only=True)["weight"] == 7.0)


def test_resume_skips_a_checkpoint_cut_short_and_uses_the_one_before(demo, tmp_path, caplog):
    identity = _identity(tmp_path, demo)
    identity.run_id = "abc"
    torch.save({"run_identity": identity.state_dict(), "trainer": {"iteration": 4, "epoch_length": 4}},
               tmp_path / "checkpoint_epoch=1.pt")
    data = (tmp_path / "checkpoint_epoch=1.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(data[: len(data) // 2])  # a crash while writing, pre-0.5.0
    resumed = _identity(tmp_path, demo)
    with caplog.at_level("WARNING"):
        assert resumed.resume_checkpoint() == str(tmp_path / "checkpoint_epoch=1.pt")
    assert resumed.run_id == "abc" and "checkpoint_epoch=2.pt" in caplog.text


def test_random_states_restore_from_a_checkpoint_loaded_onto_the_gpu(trained):
    """
    ``--resume True`` on a GPU loads the checkpoint with ``map_location: "@device"``. ``"meta"`` moves every tensor
    off the CPU (and keeps no data), as a GPU does: the random states of a real checkpoint must still restore.
    """
    path = trained / "models" / "checkpoint_final.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)["random_states"]
    states = parse([TRAIN], device="cpu", **TINY_OVERRIDES).get_parsed_content("train#random_states")
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # the streams somewhere else
    states.load_state_dict(torch.load(path, map_location="meta", weights_only=True)["random_states"])
    assert states.state_dict() == saved  # torch, numpy, Python and every randomised transform's generator


def test_each_process_restores_its_own_random_state_on_its_own_gpu(monkeypatch, caplog):
    """
    A checkpoint of an 8-process GPU run holds each process's streams, with its GPU's generator. Rank 3 of 8
    restores rank 3's; one process (one visible GPU) restores rank 0's and warns. This machine has no GPU: the
    CUDA calls are recorded instead.
    """
    pipeline = Compose([RandFlipd("image", prob=0.5)])
    entries = []
    for rank in range(8):
        seed_process(rank)
        pipeline.set_random_state(rank)
        entries.append({**RandomStates(pipeline).state_dict()["ranks"][0], "cuda": bytes([rank]) * 16})
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    states = RandomStates(pipeline, device="cuda:0")
    for rank, world in ((3, 8), (0, 1)):
        monkeypatch.setattr(idist, "get_rank", lambda: rank)
        monkeypatch.setattr(idist, "get_world_size", lambda: world)
        with caplog.at_level("WARNING"):
            states.load_state_dict({"ranks": entries})
        state, device = restored.pop()
        assert state.device.type == "cpu" and state.dtype == torch.uint8 and device == torch.device("cuda:0")
        assert state.tolist() == [rank] * 16
        assert torch.get_rng_state().numpy().tobytes() == entries[rank]["torch"]
        assert np.random.get_state()[1].tobytes() == entries[rank]["numpy"]["keys"]
        assert [t.R.get_state()[1].tobytes() for t in states.transforms] == [
            e["keys"] for e in entries[rank]["transforms"]]
    assert caplog.text.count("holds the random states of 8 process(es) and this run has 1") == 1


def test_seed_process_seeds_each_rank_and_switches_deterministic_algorithms(monkeypatch):
    seed_process(5)
    first = torch.rand(4)
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seed_process(4, deterministic=True)  # rank 1 of a run seeded 4 draws what seed 5 draws
        assert torch.equal(torch.rand(4), first)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        seed_process(0)
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_resumed_amp_run_keeps_its_loss_scale(tmp_path):
    trainer = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))
    trainer.scaler.scale(torch.ones(1))
    trainer.scaler.update(new_scale=512.0)  # where overflowing steps have brought the scale down
    torch.save({"grad_scaler": TrainerGradScaler(trainer).state_dict()}, tmp_path / "checkpoint.pt")
    resumed = SimpleNamespace(scaler=torch.amp.GradScaler("cpu"))  # MONAI's trainer makes a new one each run()
    TrainerGradScaler(resumed).load_state_dict(
        torch.load(tmp_path / "checkpoint.pt", map_location="meta", weights_only=True)["grad_scaler"])
    assert resumed.scaler.get_scale() == 512.0
    assert TrainerGradScaler(SimpleNamespace(scaler=None)).state_dict() == {}  # no AMP (a CPU run)
    TrainerGradScaler(SimpleNamespace(scaler=None)).load_state_dict({"scale": 512.0})  # ignored, not an error


class _OnGPU(torch.Tensor):
    """
    A GPU's tensor, emulated on this machine: it says it is on cuda:0 and, as a CUDA tensor does, comes back from
    ``.cpu()`` as a plain CPU tensor. ``torch.save`` keeps its class, which ``weights_only`` loading refuses, as a
    machine without a GPU refuses a CUDA tensor loaded without ``map_location``.
    """

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)

    def cpu(self, *args, **kwargs) -> torch.Tensor:
        return self.as_subclass(torch.Tensor).clone()


class _LinearOnGPU(torch.nn.Linear):
    def state_dict(self, *args, **kwargs):
        return {k: v.as_subclass(_OnGPU) for k, v in super().state_dict(*args, **kwargs).items()}


def test_released_files_hold_cpu_tensors_when_trained_on_a_gpu(tmp_path):
    net = _LinearOnGPU(3, 2)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    optimizer.state[net.weight]["exp_avg"] = optimizer.state[net.weight]["exp_avg"].as_subclass(_OnGPU)
    assert {t.device.type for t in net.state_dict().values()} == {"cuda"}
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt").attach(engine)
    AtomicCheckpointSaver(str(tmp_path), {"model": net, "optimizer": optimizer}, save_interval=1).attach(engine)
    engine.run([0], max_epochs=1)
    model = torch.load(tmp_path / "model.pt", weights_only=True)  # no map_location, as ckpt_export loads it
    checkpoint = torch.load(tmp_path / "checkpoint_epoch=1.pt", weights_only=True)
    tensors = [*model.values(), *checkpoint["model"].values(), *checkpoint["optimizer"]["state"][0].values()]
    assert len(tensors) == 7 and all(type(t) is torch.Tensor and t.device.type == "cpu" for t in tensors)
    torch.testing.assert_close(model["weight"], net.weight.detach())


def test_resume_refuses_a_checkpoint_of_an_earlier_layout(demo, tmp_path):
    identity = _identity(tmp_path, demo)
    earlier = {k: v for k, v in identity.state_dict().items() if k != "layout"}  # version 0.8 and before
    torch.save({"run_identity": earlier, "trainer": {"iteration": 4, "epoch_length": 4}},
               tmp_path / "checkpoint_epoch=1.pt")
    with pytest.raises(InputError, match=r"checkpoint .*checkpoint_epoch=1.pt was written by version 0.8 or earlier"):
        _identity(tmp_path, demo).resume_checkpoint()


def test_a_resume_with_more_epochs_stretches_the_cosine_schedule_and_says_so(caplog):
    def schedule(epochs: int) -> CosineSchedule:
        return CosineSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), T_max=epochs)

    first = schedule(2)
    for _ in range(2):
        first.optimizer.step()
        first.step()
    assert first.get_last_lr() == [pytest.approx(0.0, abs=1e-12)]  # the end of a 2-epoch cosine
    # torch's own closed form over 4 steps: the same numbers
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))],
                                                                           lr=0.1), T_max=4)
    longer = schedule(4)
    for _ in range(3):
        reference.optimizer.step()
        longer.optimizer.step()
        reference.step()
        longer.step()
        assert longer.get_last_lr() == pytest.approx(reference._get_closed_form_lr(), abs=1e-12)
    resumed = schedule(3)
    with caplog.at_level("WARNING", logger="scripts.resume"):
        resumed.load_state_dict(first.state_dict())
    lr = 0.1 * (1 + np.cos(2 * np.pi / 3)) / 2  # epoch 3 of 3, where a 2-epoch schedule would train at lr 0
    assert resumed.T_max == 3 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert caplog.messages == ["resumed at epoch 2 of a run started with --epochs 2: the cosine learning-rate "
                               "schedule is stretched to end at epoch 3, from lr 0.025 now."]


def test_a_window_other_than_the_training_patches_is_named(tmp_path, caplog):
    (tmp_path / "run.json").write_text('{"run_id": "r", "settings": {"patch_size": 48}}')
    with caplog.at_level("WARNING", logger="scripts.resume"):
        assert check_window(tmp_path / "model.pt", 48) and not caplog.messages
        assert check_window(tmp_path / "model.pt", 256)
    assert caplog.messages == [
        f"{tmp_path / 'model.pt'} was trained on 48-px patches (recorded in {tmp_path / 'run.json'}) but --window_size "
        "is 256: a network scores worse in windows other than its training patches' size (about 0.08 Dice on "
        "CHASE_DB1); pass --window_size 48 unless you have measured otherwise."]
    # a refined model records its backbone's patches as trained_window; a model without run.json: nothing to say
    (tmp_path / "run.json").write_text('{"settings": {"patch_size": 256, "trained_window": 48}}')
    caplog.clear()
    with caplog.at_level("WARNING", logger="scripts.resume"):
        assert check_window(tmp_path / "model.pt", 48, "--backbone_window")
        assert check_window(tmp_path / "elsewhere" / "model.pt", 96)
    assert not caplog.messages
