"""One difficulty pass under torchrun (gloo, CPU), for test_adaptive.py: each rank writes what it holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))

from monai.bundle import ConfigParser  # noqa: E402


def main(dataset_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "dataset_dir": dataset_dir, "output_dir": out_dir,
                   "image_size": 32, "features": [4, 8, 8, 16, 16], "batch_size": 4, "num_workers": 0,
                   "mc_samples": 4, "device": "cpu"})
    handler = parser.get_parsed_content("difficulty#pass")
    torch.manual_seed(0)  # the same weights on every rank, as DDP would have them
    network = parser.get_parsed_content("network_def")
    result = handler.run_pass(network, epoch=1)
    table = parser.get_parsed_content("epsilon_table")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"world": dist.get_world_size(), "scored_here": result["scored_here"], "table": table.values,
         "num_passes": table.num_passes, "D": result["D"].tolist()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
