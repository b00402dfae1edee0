# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
What makes a training run resumable, and only resumable as itself: its identity (data, network, loss and
settings), the discovery of its newest checkpoint, its random state, and the check that a trained model fits
the network an evaluation or inference builds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import re
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from monai.transforms import Compose, Randomizable
from monai.utils import set_determinism
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR

from scripts.errors import InputError, check_int
from scripts.files import PREVIOUS, atomic_write, set_aside

__all__ = ["RunIdentity", "RandomStates", "TrainerGradScaler", "CosineSchedule", "seed_process", "check_trained_model",
           "check_window", "load_trained_model", "trained_run", "trained_window", "describe", "describe_network",
           "network_overlays"]

RUN_FILE = "run.json"  # the identity of the run whose files the checkpoint folder holds
RUN_FILES = ("model.pt", "checkpoint_final.pt", RUN_FILE)  # plus checkpoint_epoch=N.pt
CHECKPOINTS = "checkpoint_epoch=*.pt"
# what a resume checkpoint holds; 2 (version 0.9): the AMP loss scale, and the random states of every process, as
# bytes (1: the states of rank 0 alone, as tensors that a map_location moved off the CPU)
CHECKPOINT_LAYOUT = 2
logger = logging.getLogger(__name__)


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _settings(obj) -> list[str]:
    return [f"{k}={v!r}" for k, v in sorted(vars(obj).items()) if not k.startswith("_") and k != "training"
            and _plain(v)]


def describe_network(network: nn.Module) -> str:
    """Class, plain settings (e.g. ``features``), dropout layers (p, and the class where not ``nn.Dropout``) and
    parameter count of a network."""
    network = getattr(network, "module", network)  # DDP
    # element-wise dropout by its p alone, as before version 0.13; other kinds (Dropout2d) by their class too
    dropout = [m.p if type(m) is nn.Dropout else f"{type(m).__name__}({m.p})"
               for m in network.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    count = sum(p.numel() for p in network.parameters())
    return f"{type(network).__name__}({', '.join([*_settings(network), f'dropout={dropout}'])}; {count} parameters)"


def describe(obj) -> str:
    """Class and plain settings of a loss or other config component, with those of the modules it combines (MONAI
    losses keep theirs as attributes, so an overlay or a ``--loss#gamma`` override changes the description)."""
    parts = _settings(obj)
    if isinstance(obj, nn.Module):
        parts += [f"{name}={describe(child)}" for name, child in obj.named_children()]
    return f"{type(obj).__name__}({', '.join(parts)})"


def _describe_data(training: Sequence[Mapping], validation: Sequence[Mapping], dataset_dir: str | Path) -> str:
    # paths relative to dataset_dir: a data set moved to another folder is still the same data
    base = Path(dataset_dir).resolve()
    digest = hashlib.sha1()
    for split in (training, validation):
        for item in split:
            for key in ("image", "label"):
                digest.update(os.path.relpath(Path(item[key]).resolve(), base).encode() + b"\0")
        digest.update(b"|")
    return f"{len(training)} training + {len(validation)} validation images, list sha1 {digest.hexdigest()[:12]}"


def _peek(path: Path) -> dict:
    # memory-mapped: the tensors are not read, only the small entries looked at (the loader reads the file later)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


class RunIdentity:
    """
    The identity of a training run: its data (training and validation lists), network, loss and the settings
    that shape training, plus a run id drawn when the run starts from scratch. It is saved in every checkpoint
    (``state_dict``/``load_state_dict``) and as ``ckpt_dir/run.json``, so that:

    - ``--resume True`` continues from the newest readable checkpoint of *this* run, and refuses, naming the
      checkpoint and every setting that differs, a folder whose newest checkpoint belongs to another run;
    - a fresh run never mixes with another run's files: it moves them (checkpoints, ``run.json``; ``model.pt`` is
      copied, for a ``CheckpointLoader`` that fine-tunes from it) to ``ckpt_dir/previous/run-<run id>-<time>/``, keeps
      the newest ``keep_previous`` such folders and says so, so that the other run's best model stays intact;
    - evaluation and inference can tell the settings a ``model.pt`` was trained with
      (:func:`check_trained_model`).

    Args:
        ckpt_dir: the folder of the run's checkpoints and ``model.pt``.
        training, validation: the datalist entries trained and validated on (``image``/``label`` paths).
        dataset_dir: the data set's folder; paths are compared relative to it.
        network: the network trained (its class, plain settings, dropout and parameter count are compared).
        loss: the loss function (its class and plain settings, recursively).
        components: other objects that shape training, by name (the difficulty pass's scorer and ε map), compared
            by class and plain settings as the loss is.
        settings: the other config ids that make the run what it is (``image_size``, ``batch_size``, the
            difficulty pass's schedule ...). ``features``, ``dropout`` and ``image_size`` among them are what
            :func:`check_trained_model` compares.
        keep_previous: how many earlier runs' folders ``previous/`` keeps (:func:`scripts.files.set_aside`).
    """

    def __init__(self, ckpt_dir: str | Path, training: Sequence[Mapping], validation: Sequence[Mapping],
                 dataset_dir: str | Path, network: nn.Module, loss, components: Mapping | None = None,
                 settings: Mapping | None = None, keep_previous: int = 5) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.keep_previous = check_int(keep_previous, "--keep_previous")
        self.settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (settings or {}).items()}
        self.fingerprint = {
            "data": _describe_data(training, validation, dataset_dir),
            "network": describe_network(network),
            "loss": describe(loss),
            **{k: describe(v) for k, v in (components or {}).items()},
            **{k: json.dumps(v) for k, v in self.settings.items()},
        }
        self.run_id: str | None = None
        self._resume_path: str | None = None

    # -- checkpointable --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "fingerprint": dict(self.fingerprint), "layout": CHECKPOINT_LAYOUT}

    def load_state_dict(self, state: Mapping, source: str = "the checkpoint") -> None:
        if state.get("layout", 1) != CHECKPOINT_LAYOUT:
            raise InputError(f"{source} was written by version 0.8 or earlier of the bundle, whose checkpoints lack "
                             "what this version resumes (the random state of every process, the AMP loss scale): "
                             "train without --resume (its files are then moved to previous/), or finish the run "
                             "with the version that started it.")
        differences = self.differences(state.get("fingerprint", {}))
        if differences:
            raise InputError(f"{source} belongs to another run ({'; '.join(differences)}): train without --resume "
                             "(its files are then moved to previous/), or point --ckpt_dir at this run's folder.")
        self.run_id = state.get("run_id")

    def differences(self, fingerprint: Mapping) -> list[str]:
        """One ``what: checkpoint's vs this run's`` phrase per differing part of the identity."""
        keys = sorted(set(fingerprint) | set(self.fingerprint))
        return [f"{k}: {fingerprint.get(k, 'not recorded')} there, {self.fingerprint.get(k, 'not set')} here"
                for k in keys if fingerprint.get(k) != self.fingerprint.get(k)]

    # -- the two ways a run starts --------------------------------------------------------------------------
    def start(self, resume: bool) -> bool:
        """
        The first step of training (``initialize``): with ``resume``, find and check this run's newest
        checkpoint (:meth:`resume_checkpoint`); without, set another run's files aside and record this run.
        Under ``torch.distributed`` rank 0 moves and writes files, and every process waits for it.
        Returns True, for use as a config step.
        """
        if resume:
            self.resume_checkpoint()
        elif idist.get_rank() == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._set_aside_previous_run()
            self.run_id = uuid.uuid4().hex[:8]
            self._write_run_file()
        idist.barrier()
        if not resume:
            self.run_id = json.loads((self.ckpt_dir / RUN_FILE).read_text())["run_id"]
        return True

    def _write_run_file(self) -> None:
        with atomic_write(self.ckpt_dir / RUN_FILE) as f:
            json.dump({"run_id": self.run_id, "fingerprint": self.fingerprint, "settings": self.settings}, f,
                      indent=2)

    def _set_aside_previous_run(self) -> None:
        try:
            previous = json.loads((self.ckpt_dir / RUN_FILE).read_text()).get("run_id", "unknown")
        except (OSError, ValueError):
            previous = "unknown"
        # model.pt is copied, not moved: a CheckpointLoader may start this run from it (MONAI Label's training
        # inserts one); this run replaces it at its first validation
        if set_aside(self.ckpt_dir, [*RUN_FILES, CHECKPOINTS], f"run {previous}", self.keep_previous,
                     copy=["model.pt"]) is not None:
            logger.warning(f"this run starts from scratch (model.pt stays until this run's first validation replaces "
                           f"it); pass --resume True to continue run {previous} instead.")

    def resume_checkpoint(self) -> str:
        """
        The newest readable ``checkpoint_final.pt`` or ``checkpoint_epoch=N.pt`` in ``ckpt_dir`` (by the point of
        training it holds), checked to belong to this run. A file cut short by a crash is skipped with a warning.

        Raises:
            InputError: no readable checkpoint, or the newest belongs to another run (naming what differs).
        """
        if self._resume_path is not None:
            return self._resume_path
        unreadable = []
        for _, path in sorted(self._candidates(), reverse=True):
            try:
                state = _peek(path)
            except pickle.UnpicklingError as e:
                unreadable.append(f"{path.name} (holds objects that weights_only loading refuses: {e})")
                continue
            except Exception as e:  # cut short by a crash: EOFError, RuntimeError, ...
                unreadable.append(f"{path.name} ({type(e).__name__})")
                continue
            if "run_identity" not in state:
                raise InputError(f"checkpoint {path} records no run identity (written by an older version of the "
                                 "bundle), so it cannot be checked to belong to this run: train without --resume.")
            self.load_state_dict(state["run_identity"], source=f"checkpoint {path}")
            if unreadable:
                logger.warning(f"skipped unreadable checkpoint(s) in {self.ckpt_dir}: {', '.join(unreadable)}")
            self._resume_path = str(path)
            return self._resume_path
        detail = f" (unreadable: {', '.join(unreadable)})" if unreadable else ""
        raise InputError(f"--resume True was given but {self.ckpt_dir} holds no readable checkpoint_epoch=N.pt or "
                         f"checkpoint_final.pt{detail}: train without --resume.")

    def _candidates(self) -> list[tuple[float, Path]]:
        found = []
        for path in self.ckpt_dir.glob("checkpoint_*.pt"):
            match = re.fullmatch(r"checkpoint_epoch=(\d+)\.pt", path.name)
            if match:
                found.append((float(match.group(1)), path))
            elif path.name == "checkpoint_final.pt":
                try:  # Ignite saves the iteration, not the epoch
                    trainer = _peek(path).get("trainer", {})
                    found.append((trainer["iteration"] / max(trainer["epoch_length"], 1), path))
                except Exception:
                    found.append((-1.0, path))  # tried last, and reported as unreadable there
        return found


def check_trained_model(path: str | Path, network: nn.Module, option: str = "--ckpt_dir", **settings) -> bool:
    """
    Check, before an evaluation or inference starts, that ``path`` holds weights that fit ``network``: the file
    exists and loads with ``weights_only``, the ``run.json`` beside it (written by training) records the same
    network class and ``settings`` (e.g. ``features``, ``image_size``, ``dropout``) and every tensor has the
    network's shape.
    Returns True, for use as a config step. ``option`` is the command-line option that names the model's folder.

    Raises:
        InputError: naming the file and, for a model trained with other settings, the overrides to pass.
    """
    _checked_state(path, network, option, settings)
    return True


def check_window(path: str | Path, window_size, option: str = "--window_size") -> bool:
    """
    Warn, before an evaluation or inference starts, when the network in ``path`` will see windows of another size
    than it was trained on: the ``trained_window`` (else the ``patch_size``) that the ``run.json`` beside it records.
    A network trained on small patches scores worse in larger windows (on CHASE_DB1 a U-Net trained on 48-px
    patches lost about 0.08 Dice in 256-px windows and whole images, docs/results_vessels.md). Nothing is recorded
    (a polyp model, a model without ``run.json``): no warning. Returns True, for use as a config step.
    """
    trained = trained_window(path)
    if trained is not None and trained != window_size:
        logger.warning(f"{path} was trained on {trained}-px patches (recorded in {Path(path).parent / RUN_FILE}) but "
                       f"{option} is {window_size}: a network scores worse in windows other than its training "
                       f"patches' size (about 0.08 Dice on CHASE_DB1); pass {option} {trained} unless you have "
                       "measured otherwise.")
    return True


def trained_window(path: str | Path) -> int | None:
    """The window a trained model of ``path`` was trained on (``trained_window`` or ``patch_size`` in the
    ``run.json`` beside it), None where none is recorded: what a model built on it (the refiner) records."""
    try:
        settings = json.loads((Path(path).parent / RUN_FILE).read_text()).get("settings", {})
    except (OSError, ValueError):
        return None
    return settings.get("trained_window", settings.get("patch_size"))


def load_trained_model(path: str | Path, network: nn.Module, option: str = "--ckpt_dir", **settings) -> nn.Module:
    """``network`` with the weights of ``path``, after the checks of :func:`check_trained_model` (the file read
    once): a trained model as a part of another, e.g. the frozen backbone of the diffusion refiner
    (``configs/vessel/train_refiner.yaml``)."""
    getattr(network, "module", network).load_state_dict(_checked_state(path, network, option, settings))
    return network


def network_overlays(class_name: str) -> list[str]:
    """The bundle's network overlays (the files of configs/network/ and configs/vessel/ that say they are one)
    that build ``class_name``, as ``--config_file`` paths relative to the bundle root."""
    root = Path(__file__).resolve().parents[1]
    # the class is network_def's _target_, or the network that scripts.networks.with_dropout builds
    pattern = re.compile(rf"^\s*(_target_|network):\s*[\w.]*\b{re.escape(class_name)}\s*(#.*)?$", re.MULTILINE)
    found = []
    for path in sorted((root / "configs").glob("*/*.yaml")):
        text = path.read_text()
        if text.startswith("# Network overlay") and pattern.search(text):
            found.append(path.relative_to(root).as_posix())
    return found


def _checked_state(path: str | Path, network: nn.Module, option: str, settings: dict) -> dict:
    """The model state dict of ``path``, once :func:`check_trained_model`'s checks have passed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: train a model first (configs/train.yaml) or point {option} at "
                         "the folder that holds model.pt.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path} holds Python objects that weights_only loading refuses, so it was not written by "
                         f"this bundle ({str(e).splitlines()[0]}): save its state_dict only.") from e
    except Exception as e:
        raise InputError(f"{path} cannot be read: it was cut short by a crash or is not a PyTorch file "
                         f"({type(e).__name__}); restore it (see {path.parent / PREVIOUS}) or train again.") from e
    state = state.get("model", state) if isinstance(state, dict) else state
    trained, trained_class = {}, ""
    run_file = path.parent / RUN_FILE
    if run_file.is_file():
        try:
            record = json.loads(run_file.read_text())
            trained = record.get("settings", {})
            # the fingerprint describes the network as "ClassName(settings...)"
            trained_class = record.get("fingerprint", {}).get("network", "").split("(")[0]
        except ValueError:
            logger.warning(f"{run_file} is not valid JSON; checking {path} by its tensor shapes only.")
    # the class first: another network's --features would otherwise be the confusing first difference
    built = type(getattr(network, "module", network)).__name__
    if trained_class and trained_class != built:
        overlays = network_overlays(trained_class)
        default = trained_class == "DropoutUNet"  # configs/train.yaml's own network: no overlay at all
        add = " or ".join([*(["leave the network overlay out"] * default), *(f"add {o} last to --config_file"
                                                                              for o in overlays)])
        add = add or f"give --network_def the {trained_class} it was trained with"
        refined = "" if trained_class == "DiffusionRefiner" else \
            " (and configs/vessel/refiner.yaml for a refined vessel model)"
        raise InputError(f"{path} was trained as {trained_class} (recorded in {run_file}) but this command builds "
                         f"{built}: {add}{refined}.")
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
    differing = {k: trained[k] for k in given if k in trained and trained[k] != given[k]}
    if differing:
        overrides = " ".join(_override(k, v) for k, v in differing.items())
        raise InputError(f"{path} was trained with {overrides} (recorded in {run_file}) but this command has "
                         f"{' '.join(_override(k, given[k]) for k in differing)}: pass {overrides}.")
    expected = getattr(network, "module", network).state_dict()
    for name, tensor in expected.items():
        if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
            found = tuple(state[name].shape) if name in state else "missing"
            raise InputError(f"{path} does not fit network_def: {name} is {found} in the file but "
                             f"{tuple(tensor.shape)} here; pass the --features it was trained with.")
    return state


def trained_run(path: str | Path) -> str:
    """Which training run wrote the model ``path``: the run id of the ``run.json`` beside it, or, without one, the
    SHA-1 of the file; for the identity of a run that builds on that model."""
    run_file = Path(path).parent / RUN_FILE
    try:
        return f"run {json.loads(run_file.read_text())['run_id']}"
    except (OSError, ValueError, KeyError):
        return f"sha1 {hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]}" if Path(path).is_file() else "none"


def _override(name: str, value) -> str:
    """A config id and value as a command-line override: ``--image_size 64``, ``--features "[8,16,32,64,64]"``."""
    return f'--{name} "{json.dumps(value, separators=(",", ":"))}"' if isinstance(value, list) else f"--{name} {value}"


def _byte_tensor(state: bytes) -> torch.Tensor:
    # torch.set_rng_state and torch.cuda.set_rng_state take a CPU ByteTensor only
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


def _numpy_state(state: tuple) -> dict:
    name, keys, pos, has_gauss, gauss = state
    return {"keys": keys.astype("<u4").tobytes(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _numpy_tuple(state: dict) -> tuple:
    keys = np.frombuffer(state["keys"], dtype="<u4").astype(np.uint32)
    return "MT19937", keys, state["pos"], state["has_gauss"], state["gauss"]


def seed_process(seed: int, deterministic: bool = False) -> bool:
    """
    Seed this process's torch, CUDA, numpy and Python generators with ``seed + rank`` (MONAI's
    ``set_determinism``): one process draws what ``seed`` draws, and each process of a ``torch.distributed`` run
    its own dropout masks and augmentations (DDP broadcasts rank 0's initial weights, so the replicas still start
    equal; a ``DistributedSampler`` shuffles by its own seed, the same on every rank).

    ``deterministic`` also switches on ``torch.use_deterministic_algorithms`` (with ``warn_only``: an operation
    with no deterministic CUDA kernel warns, naming itself, instead of stopping training) and sets
    ``CUBLAS_WORKSPACE_CONFIG``, which deterministic cuBLAS needs. The bundle's networks upsample bilinearly
    (and the full-resolution network pools adaptively), whose CUDA backward passes have no deterministic kernel:
    on a GPU a resumed run is then close to, not bit-identical with, the uninterrupted one. On a CPU it is exact
    either way. Returns True, for use as a config step.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_determinism(seed=seed + idist.get_rank())
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    return True


class RandomStates:
    """
    The random state of a training run, as a checkpointable object (``state_dict``/``load_state_dict``): the
    torch generators (CPU, and the CUDA generator of ``device``), numpy's and Python's global ones, and the own
    generator of every randomised transform in ``transforms``. Saved with each checkpoint, it makes a resumed run
    draw exactly the batches, augmentations and dropout masks the uninterrupted run draws (with
    ``num_workers=0`` the transforms run in this process; with workers, their seeds derive from the torch
    generator).

    Every process of a ``torch.distributed`` run has streams of its own (:func:`seed_process`): the state holds
    one entry per rank (``{"ranks": [...]}``, gathered when saving; rank 0 writes the file) and each process
    restores its own. States are bytes and plain numbers, never tensors, so that a checkpoint loaded with any
    ``map_location`` (the run's GPU) restores them, and they load with ``torch.load(weights_only=True)``.

    Args:
        transforms: the pipelines whose randomised transforms to include, e.g. ``train#preprocessing``.
        device: the run's device; on a CUDA device its generator is saved and restored (not every visible GPU's).
    """

    def __init__(self, transforms: Sequence[Compose] | Compose = (), device: str | torch.device = "cpu") -> None:
        self.transforms: list[Randomizable] = []
        self.device = torch.device(device)
        self._collect(transforms, set())

    def _collect(self, obj, seen: set) -> None:
        # dictionary transforms keep array transforms with generators of their own (RandShiftIntensityd.shifter)
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, np.ndarray, torch.Tensor)):
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            self.transforms.append(obj)
        if isinstance(obj, (list, tuple)):
            children = obj
        elif isinstance(obj, dict):
            children = obj.values()
        else:
            children = vars(obj).values() if hasattr(obj, "__dict__") else ()
        for child in children:
            self._collect(child, seen)

    def _own_state(self) -> dict:
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        return {
            "torch": torch.get_rng_state().numpy().tobytes(),
            "cuda": torch.cuda.get_rng_state(self.device).numpy().tobytes() if cuda else None,
            "numpy": _numpy_state(np.random.get_state()),
            "python": random.getstate(),
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
        }

    def state_dict(self) -> dict:
        own = self._own_state()
        # Ignite calls this in every process, then saves on rank 0. Not while an exception is being handled
        # (the final checkpoint of a failed run): a process that failed alone would wait forever for the others.
        if idist.get_world_size() > 1 and sys.exc_info()[0] is None:
            return {"ranks": idist.all_gather(own)}
        return {"ranks": [own]}

    def load_state_dict(self, state: dict) -> None:
        ranks, rank, world = state["ranks"], idist.get_rank(), idist.get_world_size()
        if len(ranks) != world:
            logger.warning(f"the checkpoint holds the random states of {len(ranks)} process(es) and this run has "
                           f"{world}: processes without one of their own keep their fresh seed, so the resumed run "
                           "draws other augmentations and dropout masks than an uninterrupted one would.")
        if rank >= len(ranks):
            return
        own = ranks[rank]
        if len(own["transforms"]) != len(self.transforms):
            raise InputError(f"the checkpoint holds the random state of {len(own['transforms'])} randomised "
                             f"transforms but this pipeline has {len(self.transforms)}: the config was changed "
                             "since the run started; resume with the config it started with.")
        torch.set_rng_state(_byte_tensor(own["torch"]))
        if own["cuda"] is not None and self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_rng_state(_byte_tensor(own["cuda"]), self.device)
        np.random.set_state(_numpy_tuple(own["numpy"]))
        random.setstate(own["python"])
        for t, s in zip(self.transforms, own["transforms"]):
            t.R.set_state(_numpy_tuple(s))


class TrainerGradScaler:
    """
    The loss scale of a trainer's automatic mixed precision (``amp``), as a checkpointable object: without it a
    resumed run starts again from the initial scale of 2^16 and skips the steps whose gradients overflow at it.
    MONAI's trainer makes a new ``GradScaler`` at each ``run()``, so it is looked up when saved or restored
    (``CheckpointLoader`` restores at ``STARTED``, after ``run()`` made it). Without AMP there is nothing to
    save; a state saved with AMP is ignored by a run without it.

    Args:
        trainer: the ``SupervisedTrainer`` (``train#trainer``).
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        scaler = getattr(self.trainer, "scaler", None)
        return scaler.state_dict() if scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        scaler = getattr(self.trainer, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)


class CosineSchedule(CosineAnnealingLR):
    """
    torch's ``CosineAnnealingLR`` in closed form, ``lr_e = η_min + (η_0 − η_min)(1 + cos(π e / T_max)) / 2`` after
    ``e`` steps (one an epoch), whose length stays the run's when a checkpoint is loaded: ``--resume`` with a larger
    ``--epochs`` *stretches* the schedule to end at the new last epoch (torch's would keep the checkpoint's
    ``T_max``, run at ``η_min`` past it and then climb back up), and the log says so. From the resumed epoch on, the
    learning rate is the one a run of the new length has there. Load it after the optimizer (``CheckpointLoader``
    loads in ``load_dict`` order), whose learning rate it then sets.

    Takes the arguments of ``torch.optim.lr_scheduler.CosineAnnealingLR``.
    """

    def get_lr(self) -> list[float]:
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        t_max = self.T_max
        super().load_state_dict(state_dict)
        if self.T_max != t_max:
            self.T_max = t_max
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
            self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            logger.warning(f"resumed at epoch {self.last_epoch} of a run started with --epochs "
                           f"{state_dict['T_max']}: the cosine learning-rate schedule is stretched to end at epoch "
                           f"{t_max}, from lr {self._last_lr[0]:.3g} now.")
