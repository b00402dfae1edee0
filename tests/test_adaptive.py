"""The uncertainty-adaptive training: schedule, the pass's side effects, resume, multi-process, end to end."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLE_ROOT, TINY, TINY_OVERRIDES, TRAIN, parse, read_json, run
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from scripts.difficulty import EpsilonTable
from scripts.difficulty import DifficultyPass

PASSES = ["--mc_start", "1", "--mc_interval", "1", "--mc_samples", "3"]


@pytest.mark.parametrize("start,interval,due", [(0, 10, [10, 20]), (1, 1, list(range(1, 21))), (3, 4, [3, 7, 11, 15, 19]),
                                                (5, 100, [5])])
def test_schedule_of_algorithm_1(start, interval, due):
    handler = DifficultyPass([], scorer=None, eps_map=None, table=EpsilonTable(), start=start, interval=interval)
    assert [e for e in range(1, 21) if handler.is_due(e)] == due


DICE_ERROR = {"difficulty#scorer": {"_target_": "scripts.difficulty.DiceErrorDifficulty"}}  # its overlay's content
NO_HISTORY = {"difficulty#pass#history": None}


def difficulty_pass(demo, **overrides) -> tuple[DifficultyPass, torch.nn.Module]:
    """The config's difficulty pass (``difficulty#pass``) and network, on the demo set with the tiny network."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / TRAIN))
    # no TensorBoard writer: a test has no use for its event files
    parser.update({"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(demo), "device": "cpu", **TINY_OVERRIDES,
                   "train#summary_writer": None, **overrides})
    return parser.get_parsed_content("difficulty#pass"), parser.get_parsed_content("network")


def test_pass_leaves_the_network_untouched(demo):
    handler, network = difficulty_pass(demo, mc_samples=3, **NO_HISTORY)
    network.train()
    network(torch.rand(4, 3, 32, 32)).sum().backward()  # non-trivial BatchNorm statistics and gradients
    before = {k: v.clone() for k, v in network.state_dict().items()}
    grads = [p.grad.clone() for p in network.parameters()]
    rng = torch.get_rng_state()
    result = handler.run_pass(network, epoch=1)
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items()), "weights or BN stats changed"
    assert all(torch.equal(p.grad, g) for p, g in zip(network.parameters(), grads)), "gradients changed"
    assert network.training and all(m.training for m in network.modules())
    assert torch.equal(torch.get_rng_state(), rng), "the pass moved the training's random stream"
    assert len(result["eps"]) == len(read_json(demo / "datalist.json")["training"]) == result["scored_here"]


def test_history_keeps_one_set_of_rows_per_pass(demo, tmp_path):
    handler, network = difficulty_pass(demo, mc_samples=2, output_dir=str(tmp_path))
    for epoch in (1, 2):
        handler.run_pass(network, epoch)
    handler.table.num_passes = 1  # as restored from a checkpoint written between the two passes
    handler.run_pass(network, 2)  # the pass of epoch 2 again, after the resume
    rows = list(csv.DictReader(open(tmp_path / "difficulty_history.csv")))
    n_train = len(read_json(demo / "datalist.json")["training"])
    assert [sum(r["pass"] == k for r in rows) for k in ("1", "2")] == [n_train, n_train] and len(rows) == 2 * n_train


def test_shuffled_control_hands_out_the_same_eps_values_in_another_order(demo):
    # D over the label's foreground: the untrained network predicts no polyp anywhere, so the default's region (the
    # predicted foreground) is empty and every D 0
    label = {**NO_HISTORY, "difficulty#scorer#region": "label"}
    ranked, network = difficulty_pass(demo, mc_samples=3, **label)
    shuffled, _ = difficulty_pass(demo, mc_samples=3, **label, **{"difficulty#eps_map#assignment": "shuffled"})
    a, b = ranked.run_pass(network, epoch=1), shuffled.run_pass(network, epoch=1)
    assert torch.equal(a["D"], b["D"]) and a["labels"] == b["labels"]  # same scores: only the assignment differs
    assert torch.equal(b["eps"].sort().values, a["eps"].sort().values)  # the same values ...
    assert not torch.equal(b["eps"], a["eps"])  # ... not in difficulty order
    assert [shuffled.table.values[k] for k in b["labels"]] == b["eps"].tolist()
    assert a["eps"].argmax() == a["D"].argmax()  # ranked: the hardest image gets the largest eps


def test_dice_error_control_scores_one_minus_dice_of_the_mean_prediction(demo, trained):
    from monai.metrics import compute_dice
    from scripts.uncertainty import mc_foreground_samples

    handler, network = difficulty_pass(demo, mc_samples=3, **NO_HISTORY, **DICE_ERROR)
    # trained weights: an untrained network's mean sits at 0.5 almost everywhere, where rounding differences
    # between two otherwise identical float computations flip the thresholded mask pixel by pixel
    network.load_state_dict(torch.load(trained / "models" / "model.pt", weights_only=True))
    result = handler.run_pass(network, epoch=1)
    # an independent recomputation: the same seeded dropout masks, MONAI's Dice of the thresholded mean
    batch = next(iter(torch.utils.data.DataLoader(handler.dataset, batch_size=len(handler.dataset),
                                                  collate_fn=__import__("monai").data.list_data_collate)))
    with torch.random.fork_rng():
        torch.manual_seed(handler.seed + 100_003 * 1)
        mean = torch.cat([mc_foreground_samples(network, batch["image"].as_tensor()[i:i + handler.batch_size], 3,
                                                handler.chunk_size).mean(0)
                          for i in range(0, len(handler.dataset), handler.batch_size)])
    dice = compute_dice((mean[:, None] > 0.5).float(), (batch["label"].as_tensor() > 0.5).float(), ignore_empty=False)
    assert torch.allclose(result["D"], 1 - dice[:, 0].double(), atol=1e-6)


def _recorded_run(demo, tmp_path, adaptive: bool):
    """Train 3 epochs in-process; record each iteration's batch and random state."""
    workflow = ConfigWorkflow(config_file=str(BUNDLE_ROOT / TRAIN), workflow_type="train",
                              meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
                              logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"), bundle_root=str(BUNDLE_ROOT),
                              dataset_dir=str(demo), ckpt_dir=str(tmp_path / "m"), output_dir=str(tmp_path / "e"),
                              epochs=3, mc_start=1, mc_interval=1, mc_samples=3, adaptive=adaptive, **TINY_OVERRIDES)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    seen = []

    @trainer.on(Events.ITERATION_STARTED)
    def record(engine):
        batch = engine.state.batch
        seen.append((tuple(batch["label"].meta["filename_or_obj"]), batch["image"].as_tensor().clone(),
                     torch.get_rng_state().clone()))

    workflow.run()
    workflow.finalize()
    return seen, workflow.parser.get_parsed_content("epsilon_table")


def test_the_pass_does_not_change_batches_augmentations_or_random_stream(demo, tmp_path):
    with_pass, table = _recorded_run(demo, tmp_path / "on", adaptive=True)
    without, untouched = _recorded_run(demo, tmp_path / "off", adaptive=False)
    assert table.num_passes == 3 and untouched.num_passes == 0
    assert len(with_pass) == len(without) > 0
    for (names_a, images_a, rng_a), (names_b, images_b, rng_b) in zip(with_pass, without):
        assert names_a == names_b
        assert torch.equal(images_a, images_b)  # same augmentations
        assert torch.equal(rng_a, rng_b)  # same dropout masks to come


def test_adaptive_training_end_to_end(demo, tmp_path):
    out = tmp_path / "e"
    run("-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--dataset_dir", str(demo), "--epochs", "2",
        "--ckpt_dir", str(tmp_path / "m"), "--output_dir", str(out), *TINY, *PASSES)
    n_train = len(read_json(demo / "datalist.json")["training"])
    rows = list(csv.DictReader(open(out / "difficulty_history.csv")))
    assert {k: sum(r["pass"] == k for r in rows) for k in ("1", "2")} == {"1": n_train, "2": n_train}
    assert {"epoch", "image", "D", "D_norm", "eps"} <= set(rows[0])
    last = [float(r["eps"]) for r in rows if r["pass"] == "2"]
    assert len(set(last)) > n_train // 2 and 0.0 <= min(last) and max(last) <= 0.5  # per-image, in [eps_min, eps_max]
    state = torch.load(tmp_path / "m" / "checkpoint_final.pt", weights_only=True)
    assert state["epsilon_table"]["num_passes"] == 2 and len(state["epsilon_table"]["values"]) == n_train
    saved = dict(state["epsilon_table"]["values"])
    for r in rows:
        if r["pass"] == "2":
            assert saved[r["label"]] == pytest.approx(float(r["eps"]), rel=1e-5)
    assert {"torch", "numpy", "python", "transforms"} <= set(state["random_states"]["ranks"][0])
    assert len(list((out / "mc_maps").glob("pass_*.npz"))) == 2
    # the label audit of the last pass: every training image once, most suspect first, from the history's numbers
    from scripts.audit import read_label_audit

    audit = read_label_audit(out / "label_audit.csv")
    last_rows = {r["label"]: r for r in rows if r["pass"] == "2"}
    assert sorted(a["label"] for a in audit) == sorted(last_rows) and [a["rank"] for a in audit] == list(
        range(1, n_train + 1))
    assert all(a["suspicion"] >= b["suspicion"] for a, b in zip(audit, audit[1:]))
    assert all(a["dice_error"] == pytest.approx(float(last_rows[a["label"]]["dice_error"]), abs=1e-5) for a in audit)
    assert (out / "figures" / "label_audit.png").is_file()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "epsilon_distribution.png" in figures and len([f for f in figures if f.startswith("uncertainty_")]) >= 2


def test_a_killed_run_resumes_to_the_same_eps_and_weights(demo, tmp_path):
    def args(name, *extra):
        return ["-m", "monai.bundle", "run", "training", "--config_file", TRAIN, "--dataset_dir", str(demo),
                "--epochs", "3", "--ckpt_dir", str(tmp_path / name), "--output_dir", str(tmp_path / f"{name}_e"),
                *TINY, *PASSES, *extra]

    run(*args("straight"))
    victim = subprocess.Popen([sys.executable, *args("killed")], cwd=BUNDLE_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "checkpoint_epoch=1.pt").exists() and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    victim.kill()
    victim.wait()
    assert not (tmp_path / "killed" / "checkpoint_final.pt").exists(), "the run finished before it was killed"
    run(*args("killed", "--resume", "True"))
    a = torch.load(tmp_path / "straight" / "checkpoint_final.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint_final.pt", weights_only=True)
    assert a["epsilon_table"] == b["epsilon_table"] and a["epsilon_table"]["num_passes"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_two_processes_score_their_shards_hold_the_same_table_and_draw_their_own_randoms(demo, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29517", str(BUNDLE_ROOT / "tests" / "ddp_pass.py"), str(demo), str(tmp_path)],
                          cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = read_json(tmp_path / "rank0.json"), read_json(tmp_path / "rank1.json")
    n_train = len(read_json(demo / "datalist.json")["training"])
    assert r0["world"] == r1["world"] == 2
    assert r0["scored_here"] + r1["scored_here"] == n_train and abs(r0["scored_here"] - r1["scored_here"]) <= 1
    assert r0["table"] == r1["table"] and len(r0["table"]) == n_train and r0["num_passes"] == 1
    assert r0["D"] == r1["D"]
    # each rank draws its own dropout masks and augmentations (seed + rank) from the same initial weights
    assert r0["weights"] == r1["weights"]
    assert r0["dropout_mask"] != r1["dropout_mask"]
    assert all(a != b for a, b in zip(r0["augmented"], r1["augmented"]))


# with a MONAI network, FlexibleUNet (its encoder-once split, BatchNorm, a backbone), as configs/network/ builds it
MULTI_GPU_TRAIN = "['configs/train.yaml','configs/multi_gpu_train.yaml','configs/network/flexible_unet.yaml']"
FLEXIBLE_UNET = {"features": [16, 8, 8, 8, 4]}


def multi_gpu_training(demo, out: Path, *extra: str, port: int = 29523) -> list[str]:
    """The command of a 2-process (gloo) run of configs/multi_gpu_train.yaml, 3 epochs, a pass each epoch."""
    tiny = [*TINY[:2], "--features", json.dumps(FLEXIBLE_UNET["features"]), *TINY[4:]]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m",
            "monai.bundle", "run", "training", "--config_file", MULTI_GPU_TRAIN, "--backend", "gloo", "--device", "cpu",
            "--dataset_dir", str(demo), "--epochs", "3", "--ckpt_dir", str(out / "m"), "--output_dir", str(out / "e"),
            *tiny, *PASSES[:4], "--mc_samples", "2", *extra]


@pytest.fixture(scope="module")
def multi_gpu_run(demo, tmp_path_factory) -> Path:
    """configs/multi_gpu_train.yaml run uninterrupted, with ``--tracking mlflow``: its folder (m/, e/)."""
    out = tmp_path_factory.mktemp("multi_gpu")
    proc = subprocess.run(multi_gpu_training(demo, out, "--tracking", "mlflow", "--experiment_name", "polyp"),
                          cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_multi_gpu_train_config_under_torchrun_with_gloo(demo, multi_gpu_run):
    """
    configs/multi_gpu_train.yaml, 2 CPU processes: DDP training with the pass sharded, rank-0 checkpoints, and
    ``--tracking mlflow`` with MONAI's local store (``output_dir/mlruns.db``) written by rank 0 alone.
    """
    import mlflow  # requirements-dev.txt

    n_train = len(read_json(demo / "datalist.json")["training"])
    state = torch.load(multi_gpu_run / "m" / "checkpoint_final.pt", weights_only=True)
    assert state["epsilon_table"]["num_passes"] == 3 and len(state["epsilon_table"]["values"]) == n_train
    assert len(state["random_states"]["ranks"]) == 2  # each process's streams
    network = parse(["configs/train.yaml", "configs/network/flexible_unet.yaml"], **FLEXIBLE_UNET)
    for saved in (state["model"], torch.load(multi_gpu_run / "m" / "model.pt", weights_only=True)):
        network.get_parsed_content("network_def").load_state_dict(saved)  # the module, not the DDP wrapper
    rows = list(csv.DictReader(open(multi_gpu_run / "e" / "difficulty_history.csv")))
    assert len(rows) == 3 * n_train and len({r["label"] for r in rows}) == n_train  # both shards, written once
    # rank 0's training and validation writers only: no empty event file from rank 1
    assert len(list((multi_gpu_run / "e").glob("events.out.tfevents.*"))) == 2
    client = mlflow.tracking.MlflowClient(f"sqlite:///{multi_gpu_run / 'e' / 'mlruns.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("polyp").experiment_id])  # one run: rank 0's
    losses = client.get_metric_history(tracked.info.run_id, "train_loss")
    assert tracked.info.status == "FINISHED" and len(losses) == state["trainer"]["iteration"]


def test_a_killed_multi_process_run_resumes_to_the_same_weights(demo, multi_gpu_run, tmp_path):
    """Killed after its first epoch and resumed, the 2-process run ends where the uninterrupted one ended."""
    victim = subprocess.Popen(multi_gpu_training(demo, tmp_path, port=29529), cwd=BUNDLE_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "m" / "checkpoint_epoch=1.pt").exists() and victim.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)  # torchrun and both of its processes
    victim.wait()
    assert not (tmp_path / "m" / "checkpoint_final.pt").exists(), "the run finished before it was killed"
    proc = subprocess.run(multi_gpu_training(demo, tmp_path, "--resume", "True", port=29529), cwd=BUNDLE_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a = torch.load(multi_gpu_run / "m" / "checkpoint_final.pt", weights_only=True)
    b = torch.load(tmp_path / "m" / "checkpoint_final.pt", weights_only=True)
    assert a["epsilon_table"] == b["epsilon_table"] and a["trainer"] == b["trainer"]
    assert a["random_states"] == b["random_states"]  # every process's streams continued, not rank 0's everywhere
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
