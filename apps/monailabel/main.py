# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
MONAI Label app for this bundle: MONAI Label's own ``monaibundle`` sample app, plus the bundle's difficulty as an
active-learning score, its label audit as a review order and its inference reports.

Each model in ``--conf models`` is a folder ``APP_DIR/model/<name>``, as in the ``monaibundle`` app: a copy of this
bundle with one inference and one training config, ``polyp_bundle`` as the bundle is, ``vessel_bundle`` with the
vessel overlays merged into them (``apps/monailabel/check_server.py --task vessel`` assembles one; docs/README.md,
"MONAI Label"). Both are served by the same classes below; what differs is read from the bundle copy itself: the
label name (``metadata.json``), the keys its training reads (``fov`` for the vessel task) and its report handlers.

Everything the ``monaibundle`` app does is kept as it is (``BundleInferTask``, ``BundleTrainTask``,
``--conf epistemic_model`` scoring); this app adds, for every model that is this bundle (its inference config has
``mc_samples``), with ``<label>`` the model's foreground label (``polyp``, ``vessel``):

- inference (:class:`ReportingInferTask`): the request parameter ``mc_samples`` (0: the mask alone) and the
  bundle's own report handlers of ``configs/inference.yaml`` (``UncertaintyReport``: the probability, variance,
  entropy and mutual-information maps and ``uncertainty.csv``; the vessel overlay's ``TopologyOverlaySaver``:
  ``<stem>_topology.png`` and ``topology.csv``), written to ``<output_dir>/<image id>/`` and named, with their
  CSV rows, in the result's params; MC dropout is seeded with the bundle's ``seed``, as the bundle's inference is;
- training (:class:`DatastoreTrainTask`): the datastore's labelled images, with a field of view for a training
  that reads one (the vessel configs' ``fov``), derived from each image by the bundle's rule
  (:class:`FieldOfViewFiles`);
- the scoring method and strategy ``<label>_mi``: for every unlabelled image, the bundle's own MC-dropout inference
  (``mc_samples`` = ``<label>_mi_samples``: dropout on, BatchNorm in eval mode) and the image's difficulty D = mean
  mutual information over the *predicted* foreground (``scripts.difficulty.image_difficulty``; an image with none
  scores its mean MI over the whole frame); the strategy serves the highest D;
- the scoring method and strategy ``label_audit`` (``<label>_label_audit`` when the app serves several bundles):
  for every *labelled* image, the suspicion of the bundle's label audit (``scripts/audit.py``: by default how far
  the model's mean prediction is from the label, ``1 − Dice``), read from the ``label_audit.csv`` that the bundle's training writes, or computed
  by the bundle's ``auditing`` (``configs/audit.yaml``) when that file is not the audit of the current model and
  labels; the strategy serves the most suspect label not yet reviewed;
- the strategy ``epistemic``: the highest ``epistemic_entropy`` that the ``--conf epistemic_model`` scoring writes,
  which the sample app computes but offers no strategy for.

Start it with ``apps/monailabel/check_server.py`` or by hand (docs/README.md, "MONAI Label")::

    monailabel start_server --app APP_DIR --studies STUDIES --host 127.0.0.1 --port 8000 \\
        --conf models polyp_bundle --conf zoo_source github --conf preload false --conf sam2 false \\
        --conf epistemic_model polyp_bundle --conf epistemic_dropout 0.5 --conf polyp_mi_samples 10

where ``APP_DIR`` holds this ``main.py`` and the bundle at ``APP_DIR/model/polyp_bundle`` (for the vessel task:
``vessel_bundle`` and ``vessel_mi_samples``).
"""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import monai.bundle
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.transforms import SaveImaged

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.transform.post import Restored
from monailabel.utils.others.class_utils import unload_module
from monailabel.utils.others.generic import name_to_device

logger = logging.getLogger(__name__)


def _load_monaibundle_app():
    """The ``monaibundle`` sample app installed with the monailabel package (``<prefix>/monailabel/sample-apps``)."""
    candidates = [Path(sys.prefix), Path(monailabel.__file__).resolve().parents[4]]
    for prefix in candidates:
        main = prefix / "monailabel" / "sample-apps" / "monaibundle" / "main.py"
        if main.is_file():
            spec = importlib.util.spec_from_file_location("monaibundle_sample_app", main)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"the monaibundle sample app of monailabel {monailabel.__version__} was not found under "
                            f"{[str(c / 'monailabel' / 'sample-apps') for c in candidates]}")


monaibundle = _load_monaibundle_app()


def bundle_import(bundle_path: str, module: str):
    """The bundle's own ``module`` (e.g. ``scripts.difficulty``), imported as ``BundleInferTask`` imports it."""
    sys.path.insert(0, bundle_path)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(bundle_path)


def bundle_config(bundle_path: str, names: tuple[str, ...]) -> ConfigParser | None:
    """The first of ``configs/<names>`` in the bundle, read with its ``bundle_root``; None if there is none."""
    for name in names:
        path = os.path.join(bundle_path, "configs", name)
        if os.path.isfile(path):
            config = ConfigParser()
            config.read_config(path)
            config.update({"bundle_root": bundle_path})
            return config
    return None


class BundleModel:
    """
    What this app needs to know of one served copy of the bundle, read from the copy itself.

    Args:
        name: the model's name (``--conf models``).
        path: the bundle copy, ``APP_DIR/model/<name>``.
    """

    INFERENCE = ("inference.json", "inference.yaml")
    TRAINING = ("train.json", "train.yaml")
    DATASTORE_KEYS = ("image", "label")

    def __init__(self, name: str, path: str) -> None:
        self.name, self.path = name, path
        self.inference = bundle_config(path, self.INFERENCE)
        self.training = bundle_config(path, self.TRAINING)
        # the bundle's inference has MC dropout: other bundles in --conf models are the sample app's alone
        self.is_this_bundle = self.inference is not None and "mc_samples" in self.inference.config
        self.label = "foreground"
        if self.is_this_bundle:
            with open(os.path.join(path, "configs", "metadata.json")) as f:
                outputs = json.load(f)["network_data_format"]["outputs"]
            channels = next(iter(outputs.values())).get("channel_def", {})
            self.label = next((v.lower() for v in channels.values() if v.lower() != "background"), self.label)
        self.fov = self._field_of_view()

    def _field_of_view(self) -> FieldOfViewFiles | None:
        """A :class:`FieldOfViewFiles` when the training reads a ``fov`` (the vessel configs), else None."""
        if not self.is_this_bundle or self.training is None:
            return None
        keys = set()
        for t in self.training.get("train#deterministic_transforms", []):
            if isinstance(t, dict) and str(t.get("_target_", "")).split(".")[-1] == "LoadImaged":
                keys.update([t["keys"]] if isinstance(t["keys"], str) else t["keys"])
        unknown = keys - {*self.DATASTORE_KEYS, "fov"}
        if unknown:
            raise ValueError(f"{self.name}: the bundle's training reads {sorted(unknown)}, which MONAI Label's "
                             "datastore does not hold.")
        return FieldOfViewFiles(self.path, self.training.get_parsed_content("output_dir")) if "fov" in keys else None


class FieldOfViewFiles:
    """
    The field of view of each datastore image, for a bundle whose training reads one (``fov``, the vessel configs:
    patch centres and validation metrics inside it). MONAI Label's datastore holds images and labels only, so the
    FOV is derived from the image by the bundle's own rule, as ``scripts.prepare_data`` does for CHASE_DB1
    (``scripts.prepare_data.write_fov_masks``: ``scripts.data.field_of_view``, 0/255 PNG), into
    ``<output_dir>/fov/<image stem>_fov.png``, and derived again when the image is newer than it.

    Args:
        bundle_path: the bundle copy (its ``scripts`` package).
        output_dir: the training's ``output_dir``.
    """

    def __init__(self, bundle_path: str, output_dir: str) -> None:
        self.bundle_path, self.output_dir = bundle_path, Path(output_dir)

    def __call__(self, datalist: list[dict]) -> list[dict]:
        """``datalist`` with each item's ``fov`` file added."""
        todo = []
        for d in datalist:
            d["fov"] = str(self.output_dir / "fov" / f"{Path(d['image']).stem}_fov.png")
            if not os.path.isfile(d["fov"]) or os.path.getmtime(d["fov"]) < os.path.getmtime(d["image"]):
                todo.append({"image": Path(d["image"])})
        if todo:
            logger.info(f"deriving the field of view of {len(todo)} images into {self.output_dir / 'fov'}")
            bundle_import(self.bundle_path, "scripts.prepare_data").write_fov_masks(todo, self.output_dir)
        return datalist


class ReportingInferTask(BundleInferTask):
    """
    ``BundleInferTask`` that also runs the bundle's inference reports: the handlers of ``configs/inference.yaml``
    from the bundle's own package (``_target_`` in ``scripts``; the others, MONAI's checkpoint loader and Ignite's
    progress bar, serve the evaluator, which MONAI Label replaces), attached to an Ignite engine that yields the
    request's postprocessed item, as the bundle's evaluator yields its output. They write into
    ``<output_dir>/<image stem>/`` (emptied first); the result's params name the folder, its files and the first row
    of each CSV (``uncertainty``, ``topology``).

    The request parameter ``mc_samples`` (default: the bundle's, 0) sets the bundle's ``mc_samples``: N >= 2 gives
    the MC-dropout mask and, through ``UncertaintyReport``, the maps. The dropout masks are drawn from the bundle's
    ``seed`` in a forked random stream, so that a frame's maps are those of the bundle's own inference when that
    frame is the first it infers (to float rounding), and the server's random stream is left as it was.
    """

    def __init__(self, path: str, conf: dict, **kwargs) -> None:
        super().__init__(path, conf, **kwargs)
        if self.valid:
            self._config["mc_samples"] = int(self.bundle_config.config.get("mc_samples", 0))
            self.output_dir = Path(self.bundle_config.get_parsed_content("output_dir"))
            self.seed = int(self.bundle_config.config.get("seed", 0))

    def pre_transforms(self, data=None):
        mc_samples = int(data.get("mc_samples", 0)) if data else 0
        if self.bundle_config.config.get("mc_samples") != mc_samples:
            self.bundle_config["mc_samples"] = mc_samples  # the parser re-resolves every id that uses it
        return super().pre_transforms(data)

    def run_inferer(self, data, convert_to_batch=True, device="cuda"):
        devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            # the bundle's evaluator loads its first frame through a DataLoader, whose iterator draws its base seed
            # (one int64) from the seeded stream before any dropout mask is drawn: drawn here too, for the same masks
            torch.empty((), dtype=torch.int64).random_()
            return super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)

    def post_transforms(self, data=None):
        post = super().post_transforms(data)
        # before MONAI Label's Restored: the reports see the bundle's own postprocessed output
        post.insert(len(post) - 1 if post and isinstance(post[-1], Restored) else len(post), self._reports)
        return post

    def _reports(self, data: dict) -> dict:
        folder = self.output_dir / Path(str(data.get("image_path") or "image")).name.split(".")[0]
        self.bundle_config["output_dir"] = str(folder)
        sys.path.insert(0, self.bundle_path)
        try:
            handlers = [self.bundle_config.get_parsed_content(f"handlers#{i}", instantiate=True)
                        for i, h in enumerate(self.bundle_config.get("handlers", []))
                        if isinstance(h, dict) and str(h.get("_target_", "")).startswith("scripts.")]
        finally:
            sys.path.remove(self.bundle_path)
        handlers = [h for h in handlers if h is not None]  # _disabled_ (UncertaintyReport without mc_samples)
        if not handlers:
            return data
        shutil.rmtree(folder, ignore_errors=True)
        engine = Engine(lambda engine, item: [item])
        for h in handlers:
            h.attach(engine)
        engine.run([data], max_epochs=1)
        if not folder.is_dir():  # no handler reported on a still image (VideoReport reports on videos only)
            return data
        rows = {}
        for table in sorted(folder.glob("*.csv")):
            with open(table) as f:
                rows[table.stem] = next(csv.DictReader(f), {})
        data.setdefault("result", {}).update(
            {"report_dir": str(folder), "report_files": sorted(p.name for p in folder.iterdir()), **rows})
        return data


class DatastoreTrainTask(BundleTrainTask):
    """
    ``BundleTrainTask`` on the datastore's labelled images, with each image's field of view when the bundle's
    training reads one (``fov``: :class:`FieldOfViewFiles`), in the training and in the validation split alike.

    Args:
        fov: the bundle's :class:`FieldOfViewFiles`, or None.
    """

    def __init__(self, path: str, conf: dict, fov: FieldOfViewFiles | None = None, **kwargs) -> None:
        super().__init__(path, conf, **kwargs)
        self.fov = fov

    def _fetch_datalist(self, request, datastore: Datastore):
        datalist = super()._fetch_datalist(request, datastore)
        return self.fov(datalist) if self.fov else datalist


class MutualInformationScoring(ScoringMethod):
    """
    Active-learning score of every unlabelled image: the bundle's difficulty ``D = mean_{(i,j) in P} I_ij``,
    the mutual information ``I`` of an ``num_samples``-sample MC-dropout pass averaged over the predicted
    foreground ``P`` (probability >= 0.5), at the image's own size. Written to the datastore as ``key`` with the
    model file's timestamp, so that an image is scored again only after the model changed.

    Args:
        infer_task: a ``BundleInferTask`` of the bundle, without writer (its ``mc_samples`` is set here).
        num_samples: N dropout samples per image (>= 2).
        key: datastore field of the score (``<label>_mi``).
        label: the foreground's name, for the description.
    """

    def __init__(self, infer_task: BundleInferTask, num_samples: int = 10, key: str = "polyp_mi",
                 label: str = "polyp") -> None:
        if num_samples < 2:
            raise ValueError(f"{key}_samples must be >= 2 (mutual information needs two samples), got {num_samples}.")
        super().__init__(f"Mean mutual information over the predicted {label}, {num_samples} MC-dropout samples")
        self.infer_task, self.num_samples, self.key = infer_task, num_samples, key
        infer_task.bundle_config["mc_samples"] = num_samples

    def __call__(self, request, datastore: Datastore):
        image_difficulty = bundle_import(self.infer_task.bundle_path, "scripts.difficulty").image_difficulty
        model_file = self.infer_task.get_path()
        model_ts = int(Path(model_file).stat().st_mtime) if model_file and Path(model_file).exists() else 1
        images = datastore.get_unlabeled_images()
        todo = [i for i in images if datastore.get_image_info(i).get(f"{self.key}_ts") != model_ts]
        begin = time.time()
        for n, image_id in enumerate(todo, 1):
            _, data = self.infer_task(request={"image": datastore.get_image_uri(image_id),
                                               "device": request.get("device", "cuda"), "logging": "warning"})
            mi = torch.as_tensor(data["pred_mutual_information"]).float()  # (1, W, H)
            mask = torch.as_tensor(data["pred"]).reshape(mi.shape)
            score = float(image_difficulty(mi, mask, empty="image_mean")[0])
            datastore.update_image_info(image_id, {self.key: score, f"{self.key}_ts": model_ts})
            logger.info(f"{self.key}: {n}/{len(todo)} {image_id} => {score:.5f}")
        return {"total": len(images), "executed": len(todo), "skipped": len(images) - len(todo),
                "latency": round(time.time() - begin, 3)}


class LabelAuditScoring(ScoringMethod):
    """
    Review score of every labelled image: the suspicion of the bundle's label audit (``scripts/audit.py``), by
    default ``1 − Dice`` of one MC-dropout pass's mean prediction against the label (``difficulty#pass#
    audit_ranking``; its alternative ``(1 − Dice) · (1 − q_D)`` ranks D over the whole set), so the set is audited
    as one.

    The numbers are always those of ``label_audit.csv`` in the bundle's ``output_dir`` (``<bundle>/eval``: MONAI
    Label's training sets ``bundle_root``), where the bundle's training writes its audit after each difficulty pass.
    That file is used as it is when it is the audit of the current ``model.pt`` (not older) and of exactly the
    datastore's labelled images and labels (none saved since). Otherwise, as after most MONAI Label trainings (a
    pass runs at the start of its epoch, before that epoch's validation may rewrite ``model.pt``; by default none
    runs before epoch 10; ``val_split`` keeps some labels out of it), the bundle's ``auditing``
    (``configs/audit.yaml`` on ``train.yaml``, run here as MONAI Label runs the training) first rewrites it for the
    labelled images.

    Stored per image: ``key`` (the suspicion), ``key_ts`` (the model file's timestamp), ``key_label_ts`` (the
    datastore timestamp of the label the audit judged) and ``key_time`` (when the audit was stored), the last two
    for :class:`LabelAuditStrategy`. The audit runs once per model: an image labelled after it joins the next
    model's audit, so that the review queue is not started afresh (by default MONAI Label runs every scoring method
    after each training and next-sample request) while an annotator works through it.

    Args:
        bundle_path: the bundle's folder (``configs/train.yaml`` and ``configs/audit.yaml``).
        key: datastore field of the score.
        fov: the bundle's :class:`FieldOfViewFiles` when its training reads a field of view (the audit's images are
            the training's), else None.
    """

    def __init__(self, bundle_path: str, key: str = "label_audit", fov: FieldOfViewFiles | None = None) -> None:
        super().__init__("Label audit of the labelled images: (1 - Dice) (1 - rank of D), most suspect first")
        self.bundle_path, self.key, self.fov = bundle_path, key, fov
        self.configs = [os.path.join(bundle_path, "configs", name) for name in ("train.yaml", "audit.yaml")]
        config = ConfigParser()  # the training's own paths, as MONAI Label's training resolves them
        config.read_config(self.configs[0])
        config.update({"bundle_root": bundle_path})
        self.table = Path(config.get_parsed_content("output_dir")) / "label_audit.csv"
        self.model = Path(config.get_parsed_content("ckpt_dir")) / "model.pt"

    def __call__(self, request, datastore: Datastore):
        images = datastore.get_labeled_images()
        result = {"total": len(images), "executed": 0, "skipped": len(images), "audited": False}
        if not images or not self.model.is_file():
            logger.warning(f"{self.key}: nothing to audit ({len(images)} labelled images, {self.model})")
            return result
        model_ts = int(self.model.stat().st_mtime)
        if any(datastore.get_image_info(i).get(f"{self.key}_ts") == model_ts for i in images):
            return result  # this model's audit is done (MONAI Label calls every scoring after a request)
        tag = DefaultLabelTag.FINAL.value
        label_ts = {i: datastore.get_label_info(i, tag).get("ts", 0) for i in images}  # before the audit reads them
        pairs = {i: {"image": datastore.get_image_uri(i), "label": datastore.get_label_uri(i, tag)} for i in images}
        begin = time.time()
        rows = self._read(pairs)
        if (rows is None or self.table.stat().st_mtime < self.model.stat().st_mtime
                or max(label_ts.values()) >= int(self.table.stat().st_mtime)):
            datalist = [dict(p) for p in pairs.values()]
            self._audit(self.fov(datalist) if self.fov else datalist, name_to_device(request.get("device", "cuda")))
            result["audited"] = True
            rows = self._read(pairs)
            if rows is None:
                raise RuntimeError(f"the bundle's audit did not write {self.table} for the labelled images")
        now = int(time.time())
        for i in images:
            datastore.update_image_info(i, {self.key: rows[i]["suspicion"], f"{self.key}_ts": model_ts,
                                            f"{self.key}_label_ts": label_ts[i], f"{self.key}_time": now})
        top = min(rows, key=lambda i: rows[i]["rank"])
        logger.info(f"{self.key}: {len(images)} labelled images, the most suspect {top} => {rows[top]['suspicion']}")
        return {**result, "executed": len(images), "skipped": 0, "latency": round(time.time() - begin, 3)}

    def _read(self, pairs: dict) -> dict | None:
        """The table's rows by image id if it holds exactly ``pairs`` (image and label files), else None."""
        if not self.table.is_file():
            return None
        read_label_audit = bundle_import(self.bundle_path, "scripts.audit").read_label_audit
        ids = {(os.path.realpath(p["image"]), os.path.realpath(p["label"])): i for i, p in pairs.items()}
        rows = {ids.get((os.path.realpath(r["image"]), os.path.realpath(r["label"]))): r
                for r in read_label_audit(self.table)}
        return rows if set(rows) == set(pairs) else None

    def _audit(self, datalist: list[dict], device: str) -> None:
        """``monai.bundle run auditing`` on ``datalist``, in this process, as ``BundleTrainTask`` runs training."""
        logger.info(f"{self.key}: the bundle's audit of {len(datalist)} labelled images on {device}")
        sys.path.insert(0, self.bundle_path)
        unload_module("scripts")
        try:
            monai.bundle.run(run_id="auditing", meta_file=os.path.join(self.bundle_path, "configs", "metadata.json"),
                             config_file=self.configs, bundle_root=self.bundle_path, device=device,
                             **{"train#dataset#data": datalist})
        finally:
            sys.path.remove(self.bundle_path)


class LabelAuditStrategy(Strategy):
    """
    Next label to review: the labelled image with the highest ``key`` (:class:`LabelAuditScoring`) among those
    whose label is still the one the audit judged (an annotator who fixed it, i.e. saved it again, does not get
    it again before the next audit) and that this strategy has not served since that audit (a label reviewed and
    kept as it was is not served over and over; MONAI Label records each served image, as ``Epistemic`` uses).
    None when every audited label has been reviewed; ties go to the first image id.
    """

    def __init__(self, key: str = "label_audit",
                 desc: str = "Labelled image with the most suspect label (label audit) not yet reviewed") -> None:
        super().__init__(desc)
        self.key = key

    def __call__(self, request, datastore: Datastore):
        strategy, tag = request["strategy"], DefaultLabelTag.FINAL.value
        scores = {}
        for image in datastore.get_labeled_images():
            info = datastore.get_image_info(image)
            if self.key not in info:
                continue
            saved = datastore.get_label_info(image, tag).get("ts")
            served = info.get("strategy", {}).get(strategy, {}).get("ts", 0)
            if saved == info.get(f"{self.key}_label_ts") and served < info.get(f"{self.key}_time", 0):
                scores[image] = info[self.key]
        if not scores:
            return None
        image = max(sorted(scores), key=scores.get)
        logger.info(f"{strategy}: {len(scores)} labels to review; selected {image} ({self.key} {scores[image]})")
        return {"id": image, self.key: scores[image]}


# MONAILabelApp is named again because MONAI Label finds the app class by its direct base classes' names
class UncertaintyBundleApp(monaibundle.MyApp, MONAILabelApp):
    """
    The ``monaibundle`` app with, for every model that is this bundle (:class:`BundleModel`), the bundle's
    inference reports, its field of view in training, and its MI difficulty and label audit as scorings and
    strategies. The names are ``<label>_mi`` and ``label_audit`` (``<label>_label_audit`` when several bundles are
    served, whose audits are of different models); ``<name>`` for ``<label>`` if two models share a label.
    """

    def _bundles(self) -> dict[str, BundleModel]:
        if not hasattr(self, "_bundle_models"):  # init_infers runs first, from MONAILabelApp.__init__
            models = {n: BundleModel(n, p) for n, p in self.models.items()}
            self._bundle_models = {n: m for n, m in models.items() if m.is_this_bundle}
            labels = [m.label for m in self._bundle_models.values()]
            for m in self._bundle_models.values():
                m.prefix = m.label if labels.count(m.label) == 1 else m.name
                m.audit_key = "label_audit" if len(labels) == 1 else f"{m.prefix}_label_audit"
        return self._bundle_models

    def init_infers(self):
        infers = super().init_infers()
        for name, model in self._bundles().items():
            task = ReportingInferTask(model.path, self.conf)
            if task.is_valid():
                infers[name] = task
        return infers

    def init_trainers(self):
        trainers = super().init_trainers()
        for name, model in self._bundles().items():
            if name in trainers:
                trainers[name] = DatastoreTrainTask(model.path, self.conf, fov=model.fov)
        return trainers

    def init_scoring_methods(self):
        methods = super().init_scoring_methods()
        for model in self._bundles().values():
            num_samples = int(self.conf.get(f"{model.prefix}_mi_samples", "10"))
            task = BundleInferTask(model.path, self.conf, skip_writer=True, post_filter=[SaveImaged])
            if task.is_valid():
                key = f"{model.prefix}_mi"
                methods[key] = MutualInformationScoring(task, num_samples, key=key, label=model.label)
                methods[model.audit_key] = LabelAuditScoring(model.path, key=model.audit_key, fov=model.fov)
        logger.info(f"Active Learning Scoring Methods:: {list(methods)}")
        return methods

    def init_strategies(self):
        strategies = super().init_strategies()
        for model in self._bundles().values():
            key = f"{model.prefix}_mi"
            strategies[key] = Epistemic(key=key, desc=f"Unlabelled image with the highest mean MI over its predicted "
                                                      f"{model.label}")
            strategies[model.audit_key] = LabelAuditStrategy(key=model.audit_key)
        strategies["epistemic"] = Epistemic()
        return strategies
