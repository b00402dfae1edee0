"""
The first steps of configs/multi_gpu_train.yaml under torchrun (gloo, CPU), for test_adaptive.py: its `initialize`,
then one difficulty pass; each rank writes what it holds and what its random streams draw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from monai.bundle import ConfigWorkflow  # noqa: E402


def main(dataset_dir: str, out_dir: str) -> None:
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / f) for f in ("train.yaml", "multi_gpu_train.yaml")],
        workflow_type=None, bundle_root=str(BUNDLE_ROOT), dataset_dir=dataset_dir, output_dir=out_dir,
        ckpt_dir=str(Path(out_dir) / "models"), backend="gloo", device="cpu", image_size=32,
        features=[4, 8, 8, 16, 16], batch_size=4, num_workers=0, mc_samples=4)
    workflow.initialize()
    parser = workflow.parser
    network = parser.get_parsed_content("network")  # DDP
    # what this rank's streams draw: a dropout mask, and the augmentations of the first training items
    dropout = next(m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd))
    mask = (dropout.train()(torch.ones(1, 8, 4, 4)) > 0).flatten().tolist()
    dataset = parser.get_parsed_content("train#dataset")
    augmented = [dataset[i]["image"].as_tensor().flatten()[:64].tolist() for i in range(4)]
    result = parser.get_parsed_content("difficulty#pass").run_pass(network, epoch=1)
    table = parser.get_parsed_content("epsilon_table")
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"world": dist.get_world_size(), "scored_here": result["scored_here"], "table": table.values,
         "num_passes": table.num_passes, "D": result["D"].tolist(), "dropout_mask": mask, "augmented": augmented,
         "weights": [p.sum().item() for p in network.parameters()]}))
    workflow.finalize()


if __name__ == "__main__":
    main(*sys.argv[1:3])
