# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Training throughput of the bundle (``configs/train.yaml``) against a plain PyTorch loop.

The bundle side is the real ``train#trainer`` (SupervisedTrainer with its validation, stats, TensorBoard, progress
bar and per-epoch checkpoint handlers, and any postprocessing or training metric the config gives it), parsed in-process with ConfigWorkflow and the
same overrides the command line takes. The plain side is a hand-written loop (forward, loss, backward, Adam step)
over the same ``train#dataset`` object and transforms, a DataLoader with the same batch size, workers and
shuffling, a fresh ``network_def`` starting from the same weights, and the same ``loss``, lr and AMP setting; it
feeds plain tensors (``as_tensor()``), the bundle feeds MetaTensors (their cost lands in its "train step").

Validation is kept out of the timed epochs by overriding ``val_interval`` to more than the number of epochs
(the validation set is still cached at start-up, untimed): the trainer's handler list stays exactly the one a real
run has, whereas an empty validation list would switch the config to its "no validation" checkpoint handler.

After one warm-up epoch of each, the two sides alternate epoch by epoch (the plain epoch runs from the trainer's
EPOCH_COMPLETED, after the bundle epoch's timer stopped, so Ignite's own "Epoch[k] Complete. Time taken" log line
includes it) so machine noise hits both. Printed: images/s of each, the median over rounds of bundle/plain epoch
time, the share of each epoch spent waiting for batches, and where the bundle's extra time goes: every handler of
the trainer is wrapped with a timer (through Ignite's private ``_event_handlers``), so the cost of each config
component is measured in the same run rather than by ablation runs. Run on an idle machine: the epoch ratio is
only as steady as the machine, the handler times are much steadier.

    python benchmarks/train_throughput.py                      # thesis setting (224, Table 1, batch 32), demo data
    python benchmarks/train_throughput.py --image-size 96 --features 16 32 64 128 128 --batch-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))  # so that the config's `scripts.*` imports resolve

import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.utils import set_determinism  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", help="folder holding datalist.json (default: generate the demo set in a temp dir)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--features", type=int, nargs=5, default=[64, 128, 256, 512, 512])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed epochs of each side, after one warm-up epoch each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 on a shared, busy CPU")
    p.add_argument("--max-images", type=int, help="use only the first N training images (CPU-sized runs)")
    return p.parse_args()


def make_clock(device: torch.device):
    """perf_counter, after waiting for the GPU so that its queued work is charged to the right interval."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return lambda: (sync(), time.perf_counter())[1]


NAMES = {  # the handlers' function names, as the config knows them
    "_run_postprocessing": "train#postprocessing (AsDiscreted)",
    "_decollate_data": "decollate batch (for postprocessing)",
    "MeanDice": "train#key_metric (MeanDice)",
    "_compare_metrics": "key metric best-value tracking",
    "_OutputHandler": "ProgressBar",
    "CheckpointSaver": "CheckpointSaver (train#checkpoint_saver)",
}


def handler_name(f) -> str:
    f = f._parent() if hasattr(f, "_parent") else f  # unwrap Ignite's event-filter wrappers (every=N)
    owner = getattr(f, "__self__", None)
    if owner is not None and not isinstance(owner, Engine):
        return type(owner).__name__
    return getattr(f, "__qualname__", type(f).__name__).split("<locals>.")[-1]


def profile_handlers(engine: Engine, totals: defaultdict, mark: dict, clock) -> None:
    """Wrap every handler attached so far: its time accumulates in ``totals[name]`` and, when it runs inside
    the iteration function (postprocessing, decollation), is taken off ``mark["step"]``."""
    for handlers in engine._event_handlers.values():
        for i, (f, args, kwargs) in enumerate(handlers):
            def timed(*a, _f=f, _name=handler_name(f), **k):
                t = clock()
                out = _f(*a, **k)
                dt = clock() - t
                totals[_name] += dt
                if mark.get("in_step"):
                    mark["step"] -= dt
                return out
            handlers[i] = (timed, args, kwargs)


def plain_epoch(net, loader, loss_fn, opt, scaler, device, clock) -> tuple[float, float]:
    """One epoch of the plain loop: (epoch seconds, seconds blocked on the DataLoader)."""
    net.train()
    start = clock()
    it = iter(loader)  # worker start-up counts as data loading, as it does in the engine
    wait = clock() - start
    while True:
        t = clock()
        batch = next(it, None)
        wait += clock() - t
        if batch is None:
            break
        x, y = batch["image"].to(device).as_tensor(), batch["label"].to(device).as_tensor()
        opt.zero_grad()
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()  # what a plain loop logs; the bundle's StatsHandler reads it too
    return clock() - start, wait


def measure(args, device: torch.device, clock, tmp: str) -> tuple[dict, int]:
    """Run the interleaved epochs; returns the per-epoch records and the number of training images."""
    epochs = args.rounds + 1
    overrides = dict(
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(Path(args.dataset_dir).resolve()),
        ckpt_dir=f"{tmp}/models", output_dir=f"{tmp}/eval", device=f"$torch.device('{device}')",
        epochs=epochs, val_interval=epochs + 1, image_size=args.image_size, features=list(args.features),
        batch_size=args.batch_size, num_workers=args.num_workers,
    )
    if args.max_images:
        overrides["train#dataset#data"] = (f"$scripts.data.load_datalist(@datalist, 'training', @dataset_dir)"
                                           f"[:{args.max_images}]")
    wf = ConfigWorkflow(config_file=str(BUNDLE_ROOT / "configs" / "train.yaml"), workflow_type="train", **overrides)
    wf.initialize()  # caches the data sets, builds the trainer and attaches the per-epoch checkpoint saver
    parser, trainer = wf.parser, wf.parser.get_parsed_content("train#trainer")
    dataset = parser.get_parsed_content("train#dataset")

    # plain side: fresh network from network_def with the bundle's initial weights, same loss / lr / AMP
    set_determinism(seed=parser.get_parsed_content("seed"))
    net = parser.get_parsed_content("network_def", lazy=False).to(device)
    net.load_state_dict(trainer.network.state_dict())
    loss_fn = parser.get_parsed_content("loss", lazy=False)
    opt = torch.optim.Adam(net.parameters(), lr=parser.get_parsed_content("learning_rate"))
    scaler = torch.amp.GradScaler(device.type, enabled=bool(trainer.amp))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)

    # bundle side: time every handler, the epochs (start first, stop last), the batch fetches and the iterations
    totals: defaultdict[str, float] = defaultdict(float)
    rec: dict = {"bundle": [], "plain": []}
    mark: dict = {}
    profile_handlers(trainer, totals, mark, clock)

    def epoch_started(_):
        mark.update(t0=clock(), data=0.0, step=0.0, handlers=dict(totals))

    def iteration_completed(_):
        mark.update(step=mark["step"] + clock() - mark["s"], in_step=False)

    def epoch_completed(_):
        handlers = {k: v - mark["handlers"].get(k, 0.0) for k, v in totals.items()}
        rec["bundle"].append(dict(epoch=clock() - mark["t0"], data=mark["data"], step=mark["step"], handlers=handlers))
        epoch, wait = plain_epoch(net, loader, loss_fn, opt, scaler, device, clock)
        rec["plain"].append(dict(epoch=epoch, data=wait, step=epoch - wait, handlers={}))

    def first(event, handler):
        trainer.add_event_handler(event, handler)
        trainer._event_handlers[event].insert(0, trainer._event_handlers[event].pop())

    first(Events.EPOCH_STARTED, epoch_started)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda _: mark.update(b=clock()))
    first(Events.GET_BATCH_COMPLETED, lambda _: mark.update(data=mark["data"] + clock() - mark["b"]))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: mark.update(s=clock(), in_step=True))
    first(Events.ITERATION_COMPLETED, iteration_completed)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)
    trainer.run()
    return rec, len(dataset)


def report(args, device: torch.device, rec: dict, n: int) -> None:
    """Print the tables; round 0 is the warm-up of each side and is left out."""
    b, p = rec["bundle"][1:], rec["plain"][1:]
    ratios = [x["epoch"] / y["epoch"] for x, y in zip(b, p)]
    print("\n=== training throughput: bundle (train#trainer) vs plain PyTorch loop ===")
    print(f"data {args.dataset_dir}: {n} training images | image {args.image_size} | features {args.features} | "
          f"batch {args.batch_size} | workers {args.num_workers} | {device} | torch threads "
          f"{torch.get_num_threads()} | {len(b)} rounds after 1 warm-up")
    print(f"{'':8}{'epoch s (median)':>18}{'images/s':>10}{'data-loading share':>20}   per-round epoch s")
    for side, recs in (("bundle", b), ("plain", p)):
        times = [r["epoch"] for r in recs]
        med = statistics.median(times)
        share = sum(r["data"] for r in recs) / sum(times)
        print(f"{side:8}{med:18.2f}{n / med:10.1f}{share:20.1%}   " + " ".join(f"{t:.2f}" for t in times))
    ratio = statistics.median(ratios)
    print(f"ratio bundle/plain epoch time: {ratio:.3f} (median of per-round ratios "
          f"{' '.join(f'{r:.3f}' for r in ratios)}) -> {'within' if ratio <= 1.10 else 'OVER'} the 10% budget")

    # where the time goes, mean s/epoch; the differences as a share of the plain epoch
    mean = lambda recs, f: statistics.mean(f(r) for r in recs)  # noqa: E731
    names = {k for r in b for k in r["handlers"]}
    handlers = {k: mean(b, lambda r: r["handlers"].get(k, 0.0)) for k in names}
    parts = {
        "waiting for batches": lambda r: r["data"],
        "train step (to device, fwd, loss, bwd, step)": lambda r: r["step"],
        "handlers (below)": lambda r: sum(r["handlers"].values()),
        "engine bookkeeping (the rest)": lambda r: r["epoch"] - r["data"] - r["step"] - sum(r["handlers"].values()),
        "epoch": lambda r: r["epoch"],
    }
    plain_epoch_s = mean(p, parts["epoch"])
    print(f"\n{'per epoch (mean s)':48}{'bundle':>8}{'plain':>9}{'bundle-plain':>14}{'of plain':>10}")
    for label, f in parts.items():
        diff = mean(b, f) - mean(p, f)
        print(f"  {label:46}{mean(b, f):8.3f}{mean(p, f):9.3f}{diff:14.3f}{diff / plain_epoch_s:10.1%}")
    for name, sec in sorted(handlers.items(), key=lambda kv: -kv[1]):
        if sec >= 1e-3:
            print(f"    {NAMES.get(name, name):44}{sec:8.3f}{'':9}{sec:14.3f}{sec / plain_epoch_s:10.1%}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="train_throughput_") as tmp:
        if args.dataset_dir is None:
            from scripts.prepare_data import main as prepare_data

            args.dataset_dir = f"{tmp}/demo"
            prepare_data(["--demo", "--output", args.dataset_dir])
        rec, n = measure(args, device, make_clock(device), tmp)
    report(args, device, rec, n)


if __name__ == "__main__":
    main()
