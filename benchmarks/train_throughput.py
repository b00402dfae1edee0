# Copyright (c) the uncertainty-adaptive-polydice bundle authors. Apache License 2.0.
"""
Training throughput of the bundle (``configs/train.yaml``, with any overlays) against a plain PyTorch loop.

The bundle side is the real ``train#trainer`` (SupervisedTrainer with its difficulty pass, validation, stats,
TensorBoard, progress bar and per-epoch checkpoint handlers), parsed in-process with ConfigWorkflow from
``configs/train.yaml`` and the ``--overlay`` files layered on it in order, as the bundle's
``--config_file "['configs/train.yaml','configs/loss/dice.yaml']"`` layers them, with the same overrides the command
line takes. The plain side is a hand-written loop (forward, loss, backward, Adam step) over the same
``train#dataset`` object and transforms, a DataLoader with the same batch size, workers and shuffling, a fresh
``network_def`` starting from the same weights, the trainer's own loss object (so that the adaptive loss reads the
same ε table), lr and AMP setting. It feeds the image as a plain tensor (``as_tensor()``) and the label as the
MetaTensor it is: the adaptive loss finds each image's ε by the label's ``filename_or_obj``, so any loop training
with it has to keep that. The bundle feeds MetaTensors throughout (their cost lands in its "train step").

Validation is kept out of the timed epochs by overriding ``val_interval`` to more than the number of epochs
(the validation set is still cached at start-up, untimed): the trainer's handler list stays exactly the one a real
run has, whereas an empty validation list would switch the config to its "no validation" checkpoint handler.
With adaptive training (the default), the difficulty pass, due every ``mc_interval`` (τ) epochs, is moved to the
first timed epoch (``mc_start`` 2) so that one is measured: its time is taken out of that epoch and printed on its
own, as seconds, pass/plain epoch and the cost of one pass every τ epochs, ``1 + (pass/epoch)/τ`` (the measured
counterpart of ``mc_pass.py``'s compute-only estimate).

After one warm-up epoch of each, the two sides alternate epoch by epoch (the plain epoch runs from the trainer's
last EPOCH_COMPLETED handler, after the bundle epoch was timed, so Ignite's own "Epoch[k] Complete. Time taken"
log line includes it) so that machine noise hits both. Ignite's ``HandlersTimeProfiler``, attached to the trainer,
times every handler, every batch fetch and every iteration; the report takes its figures from the timed epochs
only. Printed: images/s of each side, the median over rounds of bundle/plain epoch time, the share of each epoch
spent waiting for batches, and where the bundle's extra time goes, handler by handler, so that the cost of each
config component is measured in the same run rather than by ablation runs. Run on an idle machine: the epoch ratio
is only as steady as the machine, the handler times are much steadier.

    python benchmarks/train_throughput.py                      # thesis setting (224, Table 1, batch 32), demo data
    python benchmarks/train_throughput.py --overlay configs/loss/dice.yaml         # the Dice baseline instead
    python benchmarks/train_throughput.py --image-size 96 --features 16 32 64 128 128 --batch-size 16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BUNDLE_ROOT))  # so that the config's `scripts.*` imports resolve

import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from ignite.handlers import HandlersTimeProfiler  # noqa: E402
from monai.bundle import ConfigWorkflow  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

# Ignite's event-filter wrapper (``Events.X(every=...)``, ``event_filter=...``) hides the name of a handler object
# from the profiler; in train.yaml the only such handler at EPOCH_STARTED is the difficulty pass, at EPOCH_COMPLETED
# the validation handler.
FILTERED = "Engine._handler_wrapper.<locals>.wrapper"
PASS = ("EPOCH_STARTED", FILTERED)
LABELS = {  # (event, handler name as the profiler knows it) -> what the config calls it
    PASS: "DifficultyPass",
    ("EPOCH_COMPLETED", FILTERED): "ValidationHandler",
    ("EPOCH_COMPLETED", "CheckpointSaver.interval_completed"): "train#checkpoint_saver (every epoch)",
    ("ITERATION_COMPLETED", "_OutputHandler"): "ProgressBar (per iteration)",
    ("MODEL_COMPLETED", "Workflow._register_decollate.<locals>._decollate_data"): "decollate batch (in the step)",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset-dir", help="folder holding datalist.json (default: generate the demo set in a temp dir)")
    p.add_argument("--overlay", nargs="+", default=[], metavar="YAML",
                   help="config files layered on configs/train.yaml in this order, e.g. configs/loss/dice.yaml")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--features", type=int, nargs=5, default=[64, 128, 256, 512, 512])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed epochs of each side, after one warm-up epoch each")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); 1 on a shared, busy CPU")
    p.add_argument("--max-images", type=int, help="use only the first N training images (CPU-sized runs)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def make_clock(device: torch.device):
    """perf_counter, after waiting for the GPU so that its queued work is charged to the right interval."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return lambda: (sync(), time.perf_counter())[1]


def profiled(profiler: HandlersTimeProfiler) -> dict:
    """The profiler's lists of times so far: batch fetches ("data"), the iteration function ("step") and each
    handler, keyed by (event name, handler name)."""
    lists = {"data": profiler.dataflow_times, "step": profiler.processing_times}
    for event, handlers in profiler.event_handlers_times.items():
        for name, times in handlers.items():
            lists[(getattr(event, "name", str(event)), name)] = times
    return lists


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
        # the label keeps its metadata: the adaptive loss looks up each image's eps by its file name
        x, y = batch["image"].to(device).as_tensor(), batch["label"].to(device)
        opt.zero_grad()
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()  # what a plain loop logs; the bundle's StatsHandler reads it too
    return clock() - start, wait


def measure(args, device: torch.device, clock, tmp: str) -> dict:
    """Run the interleaved epochs; returns the per-epoch records, the difficulty passes and the setting."""
    epochs = args.rounds + 1
    # validation never due; the difficulty pass (adaptive training) due at the first timed epoch, not at epoch tau
    overrides = dict(
        bundle_root=str(BUNDLE_ROOT), dataset_dir=str(Path(args.dataset_dir).resolve()),
        ckpt_dir=f"{tmp}/models", output_dir=f"{tmp}/eval", device=f"$torch.device('{device}')",
        epochs=epochs, val_interval=epochs + 1, mc_start=2, image_size=args.image_size,
        features=list(args.features), batch_size=args.batch_size, num_workers=args.num_workers,
    )
    if args.max_images:
        overrides["train#dataset#data"] = f"$@train#datalist[:{args.max_images}]"
    configs = [BUNDLE_ROOT / "configs" / "train.yaml", *(Path(f).resolve() for f in args.overlay)]
    wf = ConfigWorkflow(config_file=[str(f) for f in configs], workflow_type="train", **overrides)
    wf.initialize()  # caches the data sets, builds the trainer and attaches the per-epoch checkpoint saver
    parser, trainer = wf.parser, wf.parser.get_parsed_content("train#trainer")
    dataset = parser.get_parsed_content("train#dataset")
    rec: dict = {"bundle": [], "plain": [], "passes": [], "images": len(dataset), "loss": trainer.loss_function,
                 "tau": parser.get_parsed_content("mc_interval"),
                 "configs": [str(f.relative_to(BUNDLE_ROOT)) if f.is_relative_to(BUNDLE_ROOT) else str(f)
                             for f in configs]}

    # plain side: fresh network from network_def with the bundle's initial weights, same loss / lr / AMP
    set_determinism(seed=parser.get_parsed_content("seed"))
    net = parser.get_parsed_content("network_def", lazy=False).to(device)
    net.load_state_dict(trainer.network.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=parser.get_parsed_content("learning_rate"))
    scaler = torch.amp.GradScaler(device.type, enabled=bool(trainer.amp))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers)

    # bundle side: a bundle epoch runs from the end of the previous plain epoch to the end of the trainer's
    # EPOCH_COMPLETED handlers; the profiler's times are split into epochs by the lengths of its lists then
    profiler = HandlersTimeProfiler()
    profiler.attach(trainer)
    mark: dict = {}

    def start_bundle_epoch() -> None:
        mark.update(t0=clock(), seen={k: len(v) for k, v in profiled(profiler).items()})

    def epoch_completed(engine) -> None:
        seconds = clock() - mark["t0"]
        spent = {k: sum(v[mark["seen"].get(k, 0):]) for k, v in profiled(profiler).items()}
        handlers = {k: s for k, s in spent.items() if isinstance(k, tuple)}
        handlers.pop((Events.EPOCH_COMPLETED.name, epoch_completed.__qualname__), None)  # the plain epoch
        pass_s = handlers.pop(PASS, 0.0)
        if pass_s:
            rec["passes"].append((engine.state.epoch, pass_s))
        # handlers of the trainer's own events (MONAI's IterationEvents) run inside the iteration function
        inside = sum(s for (event, _), s in handlers.items() if event not in Events.__members__)
        rec["bundle"].append(dict(epoch=seconds - pass_s, data=spent["data"], step=spent["step"] - inside,
                                  handlers=handlers))
        # the trainer's own loss object: the adaptive one reads the eps table that the difficulty pass writes
        epoch, wait = plain_epoch(net, loader, trainer.loss_function, opt, scaler, device, clock)
        rec["plain"].append(dict(epoch=epoch, data=wait, step=epoch - wait, handlers={}))
        start_bundle_epoch()

    trainer.add_event_handler(Events.EPOCH_COMPLETED, epoch_completed)  # after the config's handlers
    start_bundle_epoch()
    trainer.run()
    return rec


def report(args, device: torch.device, rec: dict) -> None:
    """Print the tables; round 0 is the warm-up of each side and is left out."""
    b, p, n = rec["bundle"][1:], rec["plain"][1:], rec["images"]
    ratios = [x["epoch"] / y["epoch"] for x, y in zip(b, p)]
    print("\n=== training throughput: bundle (train#trainer) vs plain PyTorch loop ===")
    print(f"config {' + '.join(rec['configs'])} | loss {type(rec['loss']).__name__} | data {args.dataset_dir}: "
          f"{n} training images | image {args.image_size} | features {args.features} | batch {args.batch_size} | "
          f"workers {args.num_workers} | {device} | torch threads {torch.get_num_threads()} | {len(b)} rounds after "
          f"1 warm-up")
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
    handlers = {k: statistics.mean(r["handlers"].get(k, 0.0) for r in b) for k in {k for r in b for k in r["handlers"]}}
    parts = {
        "waiting for batches": lambda r: r["data"],
        "train step (to device, fwd, loss, bwd, step)": lambda r: r["step"],
        "handlers (below)": lambda r: sum(r["handlers"].values()),
        "engine bookkeeping (the rest)": lambda r: r["epoch"] - r["data"] - r["step"] - sum(r["handlers"].values()),
        "epoch": lambda r: r["epoch"],
    }
    plain_epoch_s = mean(p, parts["epoch"])
    shown = {LABELS.get(k, k[1]): s for k, s in sorted(handlers.items(), key=lambda kv: -kv[1])
             if s >= 1e-3}
    w = max(46, *(len(label) + 2 for label in shown))
    print(f"\n{'per epoch (mean s)':{w + 2}}{'bundle':>8}{'plain':>9}{'bundle-plain':>14}{'of plain':>10}")
    for label, f in parts.items():
        diff = mean(b, f) - mean(p, f)
        print(f"  {label:{w}}{mean(b, f):8.3f}{mean(p, f):9.3f}{diff:14.3f}{diff / plain_epoch_s:10.1%}")
    for label, sec in shown.items():
        print(f"    {label:{w - 2}}{sec:8.3f}{'':9}{sec:14.3f}{sec / plain_epoch_s:10.1%}")

    if rec["passes"]:  # adaptive training: the difficulty pass, out of the epochs above
        tau, pass_s = rec["tau"], statistics.median(s for _, s in rec["passes"])
        per_epoch = pass_s / statistics.median(r["epoch"] for r in p)
        print(f"\ndifficulty pass at epoch {', '.join(str(e) for e, _ in rec['passes'])} (every mc_interval = {tau} "
              f"epochs): {pass_s:.2f} s, pass/plain epoch {per_epoch:.2f} -> adaptive training, one pass every {tau} "
              f"epochs: {1 + per_epoch / tau:.3f}x the epochs' time (target <= 1.25); bundle with the pass / plain: "
              f"{ratio + per_epoch / tau:.3f}")


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
        rec = measure(args, device, make_clock(device), tmp)
    report(args, device, rec)


if __name__ == "__main__":
    main()
