# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
MONAI Label app for this bundle: MONAI Label's own ``monaibundle`` sample app, plus the bundle's difficulty as an
active-learning score.

Everything the ``monaibundle`` app does is kept as it is (inference and training through ``BundleInferTask`` and
``BundleTrainTask``, ``--conf epistemic_model`` scoring); this app only adds

- the scoring method ``polyp_mi``: for every unlabelled image, the bundle's own MC-dropout inference
  (``configs/inference.yaml`` with ``mc_samples`` = N: dropout on, BatchNorm in eval mode) and the image's
  difficulty D = mean mutual information over the *predicted* polyp (``scripts.difficulty.image_difficulty``; an
  image with no predicted polyp scores its mean MI over the whole frame), stored in the datastore as ``polyp_mi``;
- the strategies ``polyp_mi`` (next image = the highest D) and ``epistemic`` (the highest ``epistemic_entropy``
  that the ``--conf epistemic_model`` scoring writes, which the sample app computes but offers no strategy for).

Start it with ``apps/monailabel/check_server.py`` or by hand (docs/README.md, "MONAI Label")::

    monailabel start_server --app APP_DIR --studies STUDIES --host 127.0.0.1 --port 8000 \\
        --conf models polyp_bundle --conf zoo_source github --conf preload false --conf sam2 false \\
        --conf epistemic_model polyp_bundle --conf epistemic_dropout 0.5 --conf polyp_mi_samples 10

where ``APP_DIR`` holds this ``main.py`` and the bundle at ``APP_DIR/model/polyp_bundle``.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from pathlib import Path

import torch
from monai.transforms import SaveImaged

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.tasks.activelearning.epistemic import Epistemic
from monailabel.tasks.infer.bundle import BundleInferTask

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


# MONAILabelApp is named again because MONAI Label finds the app class by its direct base classes' names
class PolypBundleApp(monaibundle.MyApp, MONAILabelApp):
    """The ``monaibundle`` app with the bundle's MI difficulty as scoring method and strategy (module docstring)."""

    def init_scoring_methods(self):
        methods = super().init_scoring_methods()
        num_samples = int(self.conf.get("polyp_mi_samples", "10"))
        for name, path in self.models.items():
            task = BundleInferTask(path, self.conf, skip_writer=True, post_filter=[SaveImaged])
            if task.is_valid():
                methods["polyp_mi"] = MutualInformationScoring(task, num_samples)
                break  # one bundle: the score belongs to the images, not to a model name
        logger.info(f"Active Learning Scoring Methods:: {list(methods)}")
        return methods

    def init_strategies(self):
        strategies = super().init_strategies()
        strategies["polyp_mi"] = Epistemic(key="polyp_mi", desc="Unlabelled image with the highest mean MI over "
                                                                  "its predicted polyp")
        strategies["epistemic"] = Epistemic()
        return strategies
