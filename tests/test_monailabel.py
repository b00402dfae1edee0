"""The bundle in a real MONAI Label server (apps/monailabel/check_server.py), where a MONAI Label environment exists."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import BUNDLE_ROOT, CHASE, KVASIR, needs

LABEL_PYTHON = Path(os.environ.get("MONAILABEL_PYTHON", BUNDLE_ROOT / ".venv-label" / "bin" / "python"))


@needs(KVASIR)
@pytest.mark.skipif(not LABEL_PYTHON.is_file(), reason=f"no MONAI Label environment at {LABEL_PYTHON}: create it "
                    "from apps/monailabel/requirements.txt (docs/README.md) or set MONAILABEL_PYTHON")
def test_monailabel_server_infers_trains_and_scores_with_the_bundle(tmp_path):
    proc = subprocess.run(
        [str(LABEL_PYTHON), "apps/monailabel/check_server.py", "--work", str(tmp_path / "monailabel"), "--data",
         str(KVASIR), "--image-size", "96", "--features", "[16,32,64,128,128]", "--port", "8127"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert summary["ok"]
    assert summary["inference"]["polyp_pixels"] > 0 and summary["inference"]["pixels_differing"] == 0
    assert summary["training"]["tensors_changed"] > 0
    scores = summary["scores"]
    assert summary["next_image"] == max(scores, key=lambda s: scores[s]["polyp_mi"])
    # the label audit: the scoring audits all 6 labelled frames, later reads the table it wrote; the strategy serves
    # the most suspect label, then passes over the served and the re-saved one
    audit = summary["label_audit"]
    ranked, suspicion = audit["ranked"], audit["suspicion"]
    assert sorted(ranked) == sorted(suspicion) and len(ranked) == 6
    assert audit["audited_on_first_scoring"] and audit["read_table_on_third"]
    assert [suspicion[s] for s in ranked] == sorted(suspicion.values(), reverse=True)
    first, second = audit["served"]
    assert suspicion[first] == suspicion[ranked[0]]
    assert audit["resaved"] != first and second not in (first, audit["resaved"])
    assert suspicion[second] == max(v for s, v in suspicion.items() if s not in (first, audit["resaved"]))


@needs(CHASE)
@pytest.mark.skipif(not LABEL_PYTHON.is_file(), reason=f"no MONAI Label environment at {LABEL_PYTHON}: create it "
                    "from apps/monailabel/requirements.txt (docs/README.md) or set MONAILABEL_PYTHON")
def test_monailabel_server_serves_the_vessel_task(tmp_path):
    proc = subprocess.run(
        [str(LABEL_PYTHON), "apps/monailabel/check_server.py", "--task", "vessel", "--work",
         str(tmp_path / "monailabel"), "--data", str(CHASE), "--patches-per-image", "16", "--mc-samples", "4",
         "--port", "8128"],
        cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    assert summary["ok"] and summary["task"] == "vessel"
    # the served mask and topology picture are the bundle's own, and so are the MC request's maps
    inference = summary["inference"]
    assert inference["vessel_pixels"] > 0 and inference["pixels_differing"] == 0
    assert inference["reports_equal"] == [f"{inference['frame']}_topology.png"]
    mc = summary["mc_inference"]
    assert max(mc["max_map_difference"].values()) <= 1e-4
    assert {"uncertainty.csv", "topology.csv", f"{mc['frame']}_topology.png"} <= set(mc["report_files"])
    assert summary["training"]["tensors_changed"] > 0
    scores = summary["scores"]
    assert summary["next_image"] == max(scores, key=lambda s: scores[s]["vessel_mi"])
    # the label audit of the vessel stack (configs/audit.yaml on the merged train.yaml, fields of view derived)
    audit = summary["label_audit"]
    assert len(audit["ranked"]) == 4 and audit["audited_on_first_scoring"] and audit["read_table_on_third"]
    first, second = audit["served"]
    assert audit["suspicion"][first] == audit["suspicion"][audit["ranked"][0]] and second != first
