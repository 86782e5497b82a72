"""Where a CPU training step's time goes: torch.profiler over steps of a Flickr8k benchmark row
(bench/bench_flickr8k.py's settings, default the full CODER row) on a precomp folder.

The run is built as train_f30k.py builds it (trainer.TrainingRun, the row's options), trained
for --warmup steps (full queues, prototypes ready) and then profiled for --steps steps. The
step's parts are labelled from outside the code (forward hooks and wrappers, nothing edited):
data loading, each online and momentum module's forward, the losses, Sinkhorn, backward,
clipping, AdamW and the after-step updates. Prints each part's share of the profiled wall time,
then the operators with the most self CPU time. Before profiling it times the training loader alone,
without the profiler, with and without the cached text states (--loader_batches), over batches
the warm-up already read: the steady state of later epochs, to set beside the profiled steps'
data loading, whose batches are read for the first time.

    python bench/profile_step.py --data_path data_cache/flickr8k_precomp [--row coder] [--warmup 40] [--steps 8]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import bench_flickr8k  # noqa: E402
import distributed  # noqa: E402
import model as model_module  # noqa: E402
import trainer  # noqa: E402
from options import check_train_config  # noqa: E402

NO_BAR = types.SimpleNamespace(set_postfix=lambda **values: None)  # run.step's progress bar
LOSS_FUNCTIONS = ("symmetric_dcl", "triplet_loss", "pseudo_label_loss", "sinkhorn_kernel", "sinkhorn_knopp")


def labelled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return run


def label_modules(modules: dict[str, torch.nn.Module]) -> None:
    """A profiler range around each module's forward."""
    for name, module in modules.items():
        ranges: list[Any] = []

        def enter(_module: Any, _inputs: Any, name: str = name, ranges: list[Any] = ranges) -> None:
            ranges.append(record_function(name))
            ranges[-1].__enter__()

        def leave(_module: Any, _inputs: Any, _output: Any, ranges: list[Any] = ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def label_step(run: trainer.TrainingRun) -> None:
    raw = run.model
    label_modules(
        {
            f"forward: {n}": getattr(raw, n)
            for n in ("image_encoder", "text_encoder", "gcn", "image_query", "text_query")
            if hasattr(raw, n)
        }
    )
    label_modules({f"forward: momentum {n}": m for n, m in raw.momentum.items()})
    for name in LOSS_FUNCTIONS:
        if hasattr(model_module, name):
            setattr(model_module, name, labelled(f"loss: {name}", getattr(model_module, name)))
    raw._momentum_update = labelled("momentum EMA", raw._momentum_update)
    raw._update_queues_and_prototypes = labelled("queue push, prototype update", raw._update_queues_and_prototypes)
    trainer.clip_gradients = labelled("gradient clipping", trainer.clip_gradients)
    backward = torch.Tensor.backward
    torch.Tensor.backward = lambda self, *a, **k: labelled("backward", backward)(self, *a, **k)


def build_run(data_path: str, row: str, run_dir: Path) -> trainer.TrainingRun:
    settings = bench_flickr8k.run_settings(row, "full", "cpu", None)
    paths = {
        "data_path": data_path,
        "vocab_path": str(Path(data_path) / "vocab.json"),
        "concept_path": str(Path(data_path) / "concepts"),
        "text_state_cache": str(Path(data_path) / "text_states"),
    }
    overrides = bench_flickr8k.run_overrides(settings, 0, paths, run_dir, bench_flickr8k.minilm_path())
    config = {**bench_flickr8k.script_defaults(), **overrides, "log_every": 10**6, "diag_every": 0}
    check_train_config(config, resuming=False)
    return trainer.TrainingRun(config, "f30k", distributed.Dist("cpu", config["dist_timeout"]))


def batches(run: trainer.TrainingRun) -> Any:
    """The training loader's batches, epoch after epoch, each fetch labelled."""
    while True:
        run.sampler.set_epoch(run.epoch)
        run.step_in_epoch, run.window = 0, (time.perf_counter(), 0)  # as run.train_epoch starts an epoch
        loader = iter(run.loader)
        while True:
            with record_function("data loading"):
                batch = next(loader, None)
            if batch is None:
                break
            yield batch
        run.epoch += 1


def time_loading(run: trainer.TrainingRun, count: int) -> dict[str, float]:
    """Milliseconds per batch of the training loader, un-profiled, over the epoch's first `count`
    batches (read once already by the warm-up), with the cached text states and with the
    dataset's `text_states` removed; each timed twice, the second pass kept."""
    times: dict[str, float] = {}
    states = run.train_set.text_states
    for label, text_states in (("with text states", states), ("without text states", None)) * 2:
        run.train_set.text_states = text_states
        run.sampler.set_epoch(run.epoch)
        loader = iter(run.loader)
        start = time.perf_counter()
        for _ in range(count):
            next(loader)
        times[label] = 1000 * (time.perf_counter() - start) / count
    run.train_set.text_states = states
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", required=True, help="precomp folder with train/dev features, vocab, concepts")
    parser.add_argument("--row", default="coder", choices=list(bench_flickr8k.CONFIGS))
    parser.add_argument("--warmup", type=int, default=40, help="steps before profiling (queues fill)")
    parser.add_argument("--steps", type=int, default=8, help="profiled steps")
    parser.add_argument(
        "--loader_batches", type=int, default=20, help="batches the loader alone is timed over, un-profiled (0: skip)"
    )
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        run = build_run(args.data_path, args.row, Path(run_dir) / "run")
        run.forward.train()
        stream = batches(run)
        start = time.perf_counter()
        for _ in range(args.warmup):
            run.step(next(stream), NO_BAR)
        print(
            f"{args.warmup} warm-up steps: {(time.perf_counter() - start) / args.warmup:.3f} s/step; queue "
            f"fill {run.model.queues.fraction_filled():.2f}",
            flush=True,
        )
        if args.loader_batches:
            loading = time_loading(run, args.loader_batches)
            print(
                "training loader alone, un-profiled: "
                + ", ".join(f"{label} {ms:.1f} ms/batch" for label, ms in loading.items()),
                flush=True,
            )
        label_step(run)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.steps):
                with record_function("step"):
                    run.step(next(stream), NO_BAR)
            wall = time.perf_counter() - start
        run.log.close()
    events = prof.key_averages()
    print(f"\n{args.steps} profiled steps: {wall / args.steps:.3f} s/step (torch threads: {torch.get_num_threads()})")
    print("\npart | ms/step | share of the step (inclusive; nested parts are inside their parents)")
    labels = sorted(
        (
            e
            for e in events
            if e.key == "step"
            or e.key.startswith(("forward:", "loss:", "data ", "backward", "gradient", "after_", "Optimizer.step"))
        ),
        key=lambda e: -e.cpu_time_total,
    )
    step_us = next(e.cpu_time_total for e in labels if e.key == "step")
    for e in labels:
        print(f"{e.key} | {e.cpu_time_total / 1000 / args.steps:.1f} | {100 * e.cpu_time_total / step_us:.1f}%")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
