"""
Killed while saving: ``python tests/crash_while_saving.py WHAT FOLDER`` writes one file of kind WHAT into FOLDER
with the bundle's own writer, then writes it again and SIGKILLs itself half-way through that second write, as a
power cut or an OOM kill would. ``tests/test_resume.py`` then checks that the first file survived whole.

WHAT: ``model`` (the best-metric model.pt), ``checkpoint`` (checkpoint_final.pt) or ``history``
(difficulty_history.csv).
"""

from __future__ import annotations

import csv
import io
import os
import signal
import sys
from pathlib import Path

import torch
from ignite.engine import Engine, Events

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.checkpoints import AtomicCheckpointSaver  # noqa: E402
from scripts.difficulty import DifficultyHistory  # noqa: E402


def die_half_way_through_torch_save() -> None:
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
            f.flush()
        else:
            Path(f).write_bytes(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save


def die_half_way_through_csv_rows() -> None:
    real_writer = csv.writer

    class Writer:
        def __init__(self, f, *args, **kwargs):
            self.f, self.inner = f, real_writer(f, *args, **kwargs)

        def writerow(self, row):
            self.inner.writerow(row)

        def writerows(self, rows):
            for i, row in enumerate(rows):
                self.inner.writerow(row)
                if i == 1:
                    self.f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)

    csv.writer = Writer


def main(what: str, folder: Path) -> None:
    net = torch.nn.Linear(3, 2)
    if what in ("model", "checkpoint"):
        score = iter([0.5, 0.9])
        engine = Engine(lambda e, b: None)

        @engine.on(Events.EPOCH_COMPLETED)
        def validate(e):  # a key metric that improves every epoch: each epoch rewrites model.pt
            e.state.metrics = {"val_mean_dice": next(score)}
            e.state.key_metric_name = "val_mean_dice"

        if what == "model":
            saver = AtomicCheckpointSaver(str(folder), {"model": net}, save_key_metric=True,
                                          key_metric_filename="model.pt")
        else:
            saver = AtomicCheckpointSaver(str(folder), {"model": net}, save_final=True,
                                          final_filename="checkpoint_final.pt")
        saver.attach(engine)
        engine.run([0], max_epochs=1)
        torch.nn.init.constant_(net.weight, 7.0)
        die_half_way_through_torch_save()
        engine.run([0], max_epochs=2)
    elif what == "history":
        history = DifficultyHistory(folder)
        d = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
        ids = ["a.jpg", "b.jpg", "c.jpg"]
        for k, epoch in enumerate((1, 11), start=1):
            if epoch == 11:
                die_half_way_through_csv_rows()
            history.write({"pass_number": k, "epoch": epoch, "images": ids, "labels": ids, "seconds": 1.0,
                           **dict.fromkeys(("D", "D_norm", "eps", "dice_error", "suspicion"), d)}, {}, {})
    raise SystemExit("the second write finished: the crash was not simulated")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
