"""The one training loop behind train_f30k.py and train_coco.py.

A run is a flat config dict (the variables at the top of a train script, overridden from
the command line). `run(defaults, argv)` parses the overrides, sets up devices (and
torchrun/DDP when launched that way), trains with step and epoch checkpoints, validates on
dev, and can resume from any checkpoint at the exact step it was written.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from checkpoint import (build_model, code_version, concept_graph_state, load_checkpoint,
                        load_state_strict, save_checkpoint)
from utils import CoderError

PROJECT_ROOT = Path(__file__).resolve().parent

# The --demo configuration: the synthetic dataset (generated once, cached) and a model small
# enough to train in a couple of minutes on two CPU cores.
DEMO_OVERRIDES: dict[str, Any] = {
    "data_path": str(PROJECT_ROOT / "data_cache" / "demo" / "demo_precomp"),
    "vocab_path": str(PROJECT_ROOT / "data_cache" / "demo" / "demo_precomp" / "vocab.json"),
    "concept_path": str(PROJECT_ROOT / "data_cache" / "demo" / "demo_concepts"),
    "text_encoder": "bigru",
    "embed_dim": 256,
    "word_dim": 128,
    "gcn_hidden": 128,
    "queue_size": 1024,
    "num_prototypes": 64,
    "epochs": 6,
    "warmup_epochs": 1,
    "lr_decay_epoch": 5,
    "batch_size": 128,
    "lr": 5e-4,
    "val_max_images": 0,
    "test_split": "test",
    "workers": 0,
}


# ----------------------------------------------------------------------------- config

def parse_overrides(defaults: dict[str, Any], argv: list[str]) -> tuple[dict[str, Any], bool, set[str]]:
    """Apply `--name value` (or `--name=value`) overrides; returns (config, demo flag, the
    names given on the command line).

    Values take the type of the default (booleans accept true/false/1/0/yes/no). An unknown
    name is an error that lists the valid ones.
    """
    config = dict(defaults)
    demo = False
    explicit = set()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise CoderError(f"unexpected argument '{arg}': options look like --name value")
        name, _, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name == "demo" and not value:
            demo = True
            continue
        if name not in config:
            raise CoderError(f"unknown option --{name}; valid options: --demo, "
                             + ", ".join(f"--{k}" for k in sorted(config)))
        if not value:
            if not args:
                raise CoderError(f"option --{name} needs a value")
            value = args.pop(0)
        config[name] = _convert(name, value, defaults[name])
        explicit.add(name)
    if demo:
        config.update({k: v for k, v in DEMO_OVERRIDES.items() if k in config and k not in explicit})
    return config, demo, explicit


def _convert(name: str, value: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            lowered = value.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return lowered in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise CoderError(f"--{name}: cannot read '{value}' as {type(default).__name__}") from None
    return value


# ----------------------------------------------------------------------------- devices

class Dist:
    """Process layout: a single process, or one process per device under torchrun."""

    def __init__(self, device_pref: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise CoderError("--device cuda was asked for, but CUDA is not available")
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average of a scalar over all processes (for logging)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's value of a picklable object, on every process."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class ResumableSampler(Sampler[int]):
    """A DistributedSampler (per-epoch shuffle from the seed, sharded by rank) that can start
    part-way through an epoch, so a resumed run sees exactly the batches it had not seen."""

    def __init__(self, dataset_size: int, world_size: int, rank: int, seed: int, batch_size: int) -> None:
        self.base = DistributedSampler(range(dataset_size), num_replicas=world_size, rank=rank,
                                       shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        indices = list(self.base)
        return iter(indices[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return len(self.base) - self.skip_batches * self.batch_size


# ----------------------------------------------------------------------------- state

def rng_state() -> dict[str, Any]:
    """Every random generator the run touches, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_factor(step: int, steps_per_epoch: int, config: dict[str, Any]) -> float:
    """Linear warm-up over `warmup_epochs`, then x`lr_decay_factor` from `lr_decay_epoch` on."""
    warmup_steps = config["warmup_epochs"] * steps_per_epoch
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if step >= config["lr_decay_epoch"] * steps_per_epoch:
        factor *= config["lr_decay_factor"]
    return factor


# ----------------------------------------------------------------------------- run

class RunLog:
    """The plain-text log and TensorBoard writer of the main process (silent elsewhere)."""

    def __init__(self, run_dir: Path | None) -> None:
        self.file = open(run_dir / "train.log", "a", encoding="utf-8") if run_dir else None
        self.tb = None
        if run_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def line(self, text: str) -> None:
        if self.file is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"{stamp} {text}\n")
        self.file.flush()
        from tqdm import tqdm

        tqdm.write(text)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def prepare_run_dir(config: dict[str, Any], dataset: str, resume_state: dict[str, Any] | None) -> Path:
    """The run folder: the resumed run's, a new timestamped one, or the user's (never clobbered)."""
    if config["run_dir"]:
        run_dir = Path(config["run_dir"])
    elif resume_state is not None:
        run_dir = Path(config["resume"]).resolve().parent
    else:
        run_dir = PROJECT_ROOT / "runs" / f"{dataset}_{time.strftime('%Y%m%d-%H%M%S')}"
    has_results = run_dir.is_dir() and any(run_dir.glob("*.pt"))
    resuming_here = resume_state is not None and Path(config["resume"]).resolve().parent == run_dir.resolve()
    if has_results and not resuming_here and not config["overwrite"]:
        raise CoderError(f"{run_dir}: run folder already holds checkpoints; pick another --run_dir, "
                         f"resume with --resume, or pass --overwrite true")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_data(config: dict[str, Any], need_vocab_words: list[str] | None = None) -> dict[str, Any]:
    """Splits, tokenizer and concept graph of a run (the vocabulary of a resumed run wins)."""
    import concepts
    import data
    import vocab

    graph = concepts.load_concepts(config["concept_path"]) if config["concept_branch"] else None
    if config["text_encoder"] == "bert":
        tokenizer, vocab_words = vocab.BertTokenizer(config["bert_path"]), None
    elif need_vocab_words:
        tokenizer, vocab_words = vocab.Vocabulary.from_words(need_vocab_words), need_vocab_words
    else:
        tokenizer = vocab.Vocabulary.load(config["vocab_path"])
        vocab_words = list(tokenizer.idx2word)
    train = data.load_split(config["data_path"], config["train_split"])
    val = data.load_split(config["data_path"], config["val_split"],
                          max_images=config["val_max_images"] or None)
    return {"train": train, "val": val, "tokenizer": tokenizer, "graph": graph, "vocab_words": vocab_words}


def validate(model: torch.nn.Module, split: Any, tokenizer: Any, graph: Any, config: dict[str, Any],
             device: torch.device, protocol: str = "f30k") -> dict[str, Any]:
    """Retrieval metrics of the current query encoders on a split (mu from the config)."""
    import evaluation

    embeddings = evaluation.encode_split(model, split, tokenizer, graph, device,
                                         batch_size=config["eval_batch_size"], num_workers=config["workers"])
    sims = evaluation.similarity_matrix(embeddings, config["mu"], device)
    return evaluation.protocol_metrics(sims, protocol, split.captions_per_image)


def run(defaults: dict[str, Any], argv: list[str], dataset: str) -> dict[str, Any]:
    """Parse the command line over a script's defaults and train; returns the final metrics."""
    config, demo, explicit = parse_overrides(defaults, argv)
    if config["resume"]:
        config = resumed_config(config, explicit)
    if demo:
        from demo_data import make_demo_dataset

        make_demo_dataset(Path(DEMO_OVERRIDES["data_path"]).parent, seed=0)
    return train(config, dataset)


# Settings a resumed run may change; everything else must stay as the checkpoint has it.
RESUME_MAY_CHANGE = ("resume", "run_dir", "overwrite", "epochs", "device", "workers", "progress", "log_every",
                     "eval_batch_size", "val_every_steps", "checkpoint_every_steps", "test_split")


def resumed_config(config: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The checkpoint's config, with the command line's changes to `RESUME_MAY_CHANGE` only."""
    saved = load_checkpoint(config["resume"])["config"]
    refused = sorted(k for k in explicit if k not in RESUME_MAY_CHANGE and config[k] != saved.get(k))
    if refused:
        raise CoderError(f"{config['resume']}: a resumed run keeps its configuration; cannot change "
                         f"{', '.join('--' + k for k in refused)} (allowed: "
                         f"{', '.join('--' + k for k in RESUME_MAY_CHANGE[1:])})")
    return {**saved, **{k: config[k] for k in explicit if k in RESUME_MAY_CHANGE}, "resume": config["resume"]}


def train(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Train one run described by a full config (see train_f30k.py); returns the test metrics."""
    world = Dist(config["device"])
    try:
        return _train(config, dataset, world)
    finally:
        world.close()


def _amp_dtype(config: dict[str, Any], device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config["amp"] == "off":
        return None
    if config["amp"] == "fp16":
        return torch.float16
    if config["amp"] == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _train(config: dict[str, Any], dataset: str, world: Dist) -> dict[str, Any]:
    resume_state = load_checkpoint(config["resume"]) if config["resume"] else None
    if config["batch_size"] % world.world_size:
        raise CoderError(f"--batch_size {config['batch_size']} is not divisible by the "
                         f"{world.world_size} processes")
    device = world.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config["tf32"]
        torch.backends.cudnn.allow_tf32 = config["tf32"]
    seed_everything(config["seed"])

    run_dir = prepare_run_dir(config, dataset, resume_state) if world.is_main else None
    log = RunLog(run_dir if world.is_main else None)
    data = load_data(config, resume_state.get("vocab_words") if resume_state else None)
    train_split, tokenizer, graph = data["train"], data["tokenizer"], data["graph"]
    model = build_model(config, train_split.feature_dim, len(data["vocab_words"] or []), graph).to(device)
    if device.type == "cuda" and world.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config["word_vectors"] and config["text_encoder"] == "bigru" and resume_state is None:
        coverage = model.init_word_embeddings(data["vocab_words"])
        log.line(f"word embeddings from {config['word_vectors']}: {coverage:.1%} of the vocabulary covered")
    optimizer = torch.optim.AdamW(model.param_groups(config["lr"], config["weight_decay"],
                                                     config["bert_lr_scale"]))
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    amp_dtype = _amp_dtype(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    import data as data_module

    local_batch = config["batch_size"] // world.world_size
    train_set = data_module.PairDataset(train_split, tokenizer, graph)
    sampler = ResumableSampler(len(train_set), world.world_size, world.rank, config["seed"], local_batch)
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, drop_last=True,
                        num_workers=config["workers"], pin_memory=device.type == "cuda",
                        collate_fn=functools.partial(data_module.collate, pad_id=tokenizer.pad_id),
                        persistent_workers=False)
    steps_per_epoch = len(train_set) // world.world_size // local_batch
    if steps_per_epoch == 0:
        raise CoderError(f"{config['data_path']}: {len(train_set)} training captions do not fill one "
                         f"batch of {config['batch_size']}")

    epoch, step_in_epoch, global_step, best_rsum = 0, 0, 0, -math.inf
    if resume_state is not None:
        load_state_strict(model, resume_state["model"], config["resume"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scaler.load_state_dict(resume_state["scaler"])
        epoch, step_in_epoch = resume_state["epoch"], resume_state["step_in_epoch"]
        global_step, best_rsum = resume_state["global_step"], resume_state["best_rsum"]
        set_rng_state(resume_state["rng"][world.rank] if world.rank < len(resume_state["rng"])
                      else resume_state["rng"][0])

    raw_model = model
    if world.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # queues and prototypes are kept equal by construction
            find_unused_parameters=config["freeze_bert_epochs"] > 0 and config["text_encoder"] == "bert")
    forward = torch.compile(model) if config["compile"] else model

    version = code_version()
    if world.is_main:
        (run_dir / "config.json").write_text(json.dumps({**config, "code_version": version}, indent=2))
        log.line(f"run {run_dir} | code {version} | device {device} x{world.world_size} | "
                 f"{len(train_set)} training captions, {steps_per_epoch} steps/epoch")
        log.line("config " + json.dumps(config, sort_keys=True))

    def checkpoint_state() -> dict[str, Any]:
        rngs = [rng_state()]
        if world.world_size > 1:
            rngs = [None] * world.world_size
            dist.all_gather_object(rngs, rng_state())
        return {"config": config, "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": global_step, "best_rsum": best_rsum, "code_version": version,
                "vocab_words": data["vocab_words"], "concept_graph": concept_graph_state(graph),
                "image_dim": train_split.feature_dim}

    def save(name: str) -> None:
        state = checkpoint_state()  # collective under DDP: every process calls it
        if world.is_main:
            save_checkpoint(run_dir / name, state)

    from tqdm import tqdm

    metrics: dict[str, Any] = {}
    while epoch < config["epochs"]:
        sampler.set_epoch(epoch, skip_batches=step_in_epoch)
        raw_model.set_text_backbone_frozen(epoch < config["freeze_bert_epochs"])
        model.train()
        bar = tqdm(loader, total=steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{config['epochs']}",
                   disable=not world.is_main or not config["progress"], dynamic_ncols=True)
        window_start, window_items = time.perf_counter(), 0
        for batch in bar:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            factor = lr_factor(global_step, steps_per_epoch, config)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext():
                losses = forward(batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            raw_model.momentum_update()
            global_step += 1
            step_in_epoch += 1
            window_items += config["batch_size"]

            if not math.isfinite(losses["loss"].item()):
                raise CoderError(f"training diverged at step {global_step} (loss {losses['loss'].item()}); "
                                 f"try a lower --lr or --amp off")
            if global_step % config["log_every"] == 0 or step_in_epoch == steps_per_epoch:
                values = {f"loss/{k}": world.mean(v.float()).item() for k, v in losses.items()}
                elapsed = time.perf_counter() - window_start
                values["speed/captions_per_s"] = window_items / max(elapsed, 1e-9)
                values["train/grad_norm"] = float(grad_norm)
                values["train/queue_fill"] = raw_model.queue_fill()
                for i, group in enumerate(optimizer.param_groups):
                    values[f"lr/{group.get('name', i)}"] = group["lr"]
                log.scalars(values, global_step)
                bar.set_postfix(loss=f"{values['loss/loss']:.4f}", cap_s=f"{values['speed/captions_per_s']:.0f}")
                if world.is_main:
                    log.line(f"epoch {epoch + 1} step {step_in_epoch}/{steps_per_epoch} (global {global_step}) "
                             + " ".join(f"{k}={v:.5g}" for k, v in values.items()))
                window_start, window_items = time.perf_counter(), 0
            if config["val_every_steps"] and global_step % config["val_every_steps"] == 0 \
                    and step_in_epoch < steps_per_epoch:
                best_rsum = _validate_and_keep_best(raw_model, data, config, world, log, global_step,
                                                    best_rsum, save, dataset)
                model.train()
            if config["checkpoint_every_steps"] and global_step % config["checkpoint_every_steps"] == 0 \
                    and step_in_epoch < steps_per_epoch:
                save("last.pt")
                log.line(f"step checkpoint saved: epoch {epoch + 1} step {step_in_epoch} (global {global_step})")
        bar.close()
        epoch, step_in_epoch = epoch + 1, 0
        best_rsum = _validate_and_keep_best(raw_model, data, config, world, log, global_step, best_rsum,
                                            save, dataset)
        save("last.pt")
        log.line(f"epoch {epoch} done; checkpoint saved")

    if world.is_main and config["test_split"]:
        metrics = _final_test(run_dir, config, device, dataset, log)
    log.close()
    return metrics


def _validate_and_keep_best(raw_model: torch.nn.Module, data: dict[str, Any], config: dict[str, Any],
                            world: Dist, log: RunLog, global_step: int, best_rsum: float, save: Any,
                            dataset: str) -> float:
    """Validate on rank 0, share the score with every process, save `best.pt` on improvement."""
    metrics = None
    if world.is_main:
        metrics = validate(raw_model, data["val"], data["tokenizer"], data["graph"], config, raw_model_device(raw_model))
        flat = metrics["1k"] if "1k" in metrics else metrics
        log.scalars({f"val/{k}": v for k, v in flat.items()}, global_step)
        log.line(f"validation at step {global_step}: " + " ".join(f"{k}={v:.2f}" for k, v in flat.items()))
    rsum = world.broadcast(None if metrics is None else (metrics["1k"] if "1k" in metrics else metrics)["rsum"])
    if rsum > best_rsum:
        best_rsum = rsum
        save("best.pt")
        log.line(f"new best rsum {rsum:.2f}: best.pt saved")
    return best_rsum


def raw_model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _final_test(run_dir: Path, config: dict[str, Any], device: torch.device, dataset: str,
                log: RunLog) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test split, print the table, save test_metrics.json."""
    import data
    import evaluation
    from checkpoint import load_for_inference

    path = config["data_path"]
    split_file = Path(path) / f"{config['test_split']}_ims.npy"
    if not split_file.exists():
        log.line(f"no {split_file}: skipping the final test evaluation")
        return {}
    model, tokenizer, graph, saved_config = load_for_inference(run_dir / "best.pt", device)
    split = data.load_split(path, config["test_split"])
    metrics = validate(model, split, tokenizer, graph, saved_config, device,
                       protocol=dataset)
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    log.line(f"test split '{config['test_split']}' with best.pt:\n" + evaluation.format_table(metrics))
    return metrics
