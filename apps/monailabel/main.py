# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
MONAI Label app for this bundle: MONAI Label's own ``monaibundle`` sample app, plus the bundle's difficulty as an
active-learning score and its label audit as a review order.

Everything the ``monaibundle`` app does is kept as it is (inference and training through ``BundleInferTask`` and
``BundleTrainTask``, ``--conf epistemic_model`` scoring); this app only adds

- the scoring method ``polyp_mi``: for every unlabelled image, the bundle's own MC-dropout inference
  (``configs/inference.yaml`` with ``mc_samples`` = N: dropout on, BatchNorm in eval mode) and the image's
  difficulty D = mean mutual information over the *predicted* polyp (``scripts.difficulty.image_difficulty``; an
  image with no predicted polyp scores its mean MI over the whole frame), stored in the datastore as ``polyp_mi``;
- the scoring method ``label_audit``: for every *labelled* image, the suspicion of the bundle's label audit
  (``scripts/audit.py``: the model is sure of itself and far from the label), read from the ``label_audit.csv``
  that the bundle's training writes, or computed by the bundle's ``auditing`` (``configs/audit.yaml``) when that
  file is not the audit of the current model and labels; stored in the datastore as ``label_audit``;
- the strategies ``polyp_mi`` (next image = the highest D), ``epistemic`` (the highest ``epistemic_entropy``
  that the ``--conf epistemic_model`` scoring writes, which the sample app computes but offers no strategy for) and
  ``label_audit`` (next image to review = the labelled image with the most suspect label not yet reviewed).

Start it with ``apps/monailabel/check_server.py`` or by hand (docs/README.md, "MONAI Label")::

    monailabel start_server --app APP_DIR --studies STUDIES --host 127.0.0.1 --port 8000 \\
        --conf models polyp_bundle --conf zoo_source github --conf preload false --conf sam2 false \\
        --conf epistemic_model polyp_bundle --conf epistemic_dropout 0.5 --conf polyp_mi_samples 10

where ``APP_DIR`` holds this ``main.py`` and the bundle at ``APP_DIR/model/polyp_bundle``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import monai.bundle
import torch
from monai.bundle import ConfigParser
from monai.transforms import SaveImaged

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.infer.bundle import BundleInferTask
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


class MutualInformationScoring(ScoringMethod):
    """
    Active-learning score of every unlabelled image: the bundle's difficulty ``D = mean_{(i,j) in P} I_ij``,
    the mutual information ``I`` of an ``num_samples``-sample MC-dropout pass averaged over the predicted polyp
    ``P`` (probability >= 0.5), at the image's own size. Written to the datastore as ``key`` with the model file's
    timestamp, so that an image is scored again only after the model changed.

    Args:
        infer_task: a ``BundleInferTask`` of the bundle, without writer (its ``mc_samples`` is set here).
        num_samples: N dropout samples per image (>= 2).
        key: datastore field of the score.
    """

    def __init__(self, infer_task: BundleInferTask, num_samples: int = 10, key: str = "polyp_mi") -> None:
        if num_samples < 2:
            raise ValueError(f"polyp_mi_samples must be >= 2 (mutual information needs two samples), got {num_samples}")
        super().__init__(f"Mean mutual information over the predicted polyp, {num_samples} MC-dropout samples")
        self.infer_task, self.num_samples, self.key = infer_task, num_samples, key
        infer_task.bundle_config["mc_samples"] = num_samples

    def __call__(self, request, datastore: Datastore):
        sys.path.insert(0, self.infer_task.bundle_path)  # the bundle's own package, as BundleInferTask does
        try:
            from scripts.difficulty import image_difficulty
        finally:
            sys.path.remove(self.infer_task.bundle_path)
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
    Review score of every labelled image: the suspicion ``(1 − Dice) · (1 − q_D)`` of the bundle's label audit
    (``scripts/audit.py``), high where one MC-dropout pass is sure of itself (low rank ``q_D`` of its difficulty)
    and far from the label. The ranks make it a property of the whole set, so the set is audited as one.

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
    """

    def __init__(self, bundle_path: str, key: str = "label_audit") -> None:
        super().__init__("Label audit of the labelled images: (1 - Dice) (1 - rank of D), most suspect first")
        self.bundle_path, self.key = bundle_path, key
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
            self._audit(list(pairs.values()), name_to_device(request.get("device", "cuda")))
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
        sys.path.insert(0, self.bundle_path)  # the bundle's own reader, as BundleInferTask imports the bundle
        try:
            from scripts.audit import read_label_audit
        finally:
            sys.path.remove(self.bundle_path)
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
class PolypBundleApp(monaibundle.MyApp, MONAILabelApp):
    """The ``monaibundle`` app with the bundle's MI difficulty and label audit as scorings and strategies."""

    def init_scoring_methods(self):
        methods = super().init_scoring_methods()
        num_samples = int(self.conf.get("polyp_mi_samples", "10"))
        for name, path in self.models.items():
            task = BundleInferTask(path, self.conf, skip_writer=True, post_filter=[SaveImaged])
            if task.is_valid():
                methods["polyp_mi"] = MutualInformationScoring(task, num_samples)
                methods["label_audit"] = LabelAuditScoring(path)
                break  # one bundle: the score belongs to the images, not to a model name
        logger.info(f"Active Learning Scoring Methods:: {list(methods)}")
        return methods

    def init_strategies(self):
        strategies = super().init_strategies()
        strategies["polyp_mi"] = Epistemic(key="polyp_mi", desc="Unlabelled image with the highest mean MI over "
                                                                  "its predicted polyp")
        strategies["epistemic"] = Epistemic()
        strategies["label_audit"] = LabelAuditStrategy()
        return strategies
