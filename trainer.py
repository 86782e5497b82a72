"""The one training loop behind train_f30k.py and train_coco.py.

A run is a flat config dict (the variables at the top of a train script, overridden from
the command line). `run(defaults, argv)` parses the overrides, sets up devices (and
torchrun/DDP when launched that way), trains with step and epoch checkpoints, validates on
dev, and can resume from any checkpoint at the exact step it was written.
"""
from __future__ import annotations

import datetime
import functools
import inspect
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
    """Process layout: a single process, or one process per device under torchrun.

    torchrun (single- or multi-node) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT; the process group is initialised from them (NCCL on CUDA, gloo on CPU).
    `timeout_minutes` bounds how long a process waits at a collective, e.g. the other ranks
    at the broadcast of the validation score while rank 0 validates.
    """

    def __init__(self, device_pref: str, timeout_minutes: float = 60.0) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_pref not in ("auto", "cuda", "cpu"):
            raise CoderError(f"--device {device_pref}: expected auto, cuda or cpu")
        use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        if device_pref == "cuda" and not torch.cuda.is_available():
            raise CoderError("--device cuda was asked for, but CUDA is not available")
        if use_cuda and self.local_rank >= torch.cuda.device_count():
            raise CoderError(f"local rank {self.local_rank} has no GPU: this node has "
                             f"{torch.cuda.device_count()}; use --nproc_per_node <= {torch.cuda.device_count()}")
        self.device = torch.device(f"cuda:{self.local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=timeout_minutes)}
            if use_cuda:
                kwargs["device_id"] = self.device
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", **kwargs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """The average over all processes of each scalar (one all-reduce for all of them)."""
        names = list(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return dict(zip(names, stacked.tolist()))

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
    """Per-epoch shuffled indices of one process, sharded by blocks of each global batch, that
    can start part-way through an epoch (a resumed run sees exactly the batches it had not seen).

    The epoch's permutation is DistributedSampler's (seed + epoch, the same on every process).
    Global batch t is permutation[t*B : (t+1)*B] whatever the number of processes W, and rank r
    takes its r-th contiguous block of B/W indices. DistributedSampler's own sharding would
    interleave (rank r takes r, r+W, ...): the same global batch as a set, but gathered keys in
    rank-major order would then enter the queues in another order than with one process. With
    blocks, the gathered batch is exactly the one-process batch, in the same order, so W
    processes follow the one-process run (up to float rounding), and a run may even be resumed
    with another number of processes on the same data order. The trailing partial global
    batch is dropped.
    """

    def __init__(self, dataset_size: int, world_size: int, rank: int, seed: int, batch_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.base = DistributedSampler(range(dataset_size), num_replicas=1, rank=0, shuffle=True,
                                       seed=seed, drop_last=True)
        self.world_size, self.rank = world_size, rank
        self.batch_size = batch_size  # per process
        self.num_batches = dataset_size // (batch_size * world_size)
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        global_batch, local = self.batch_size * self.world_size, self.batch_size
        for t in range(self.skip_batches, self.num_batches):
            start = t * global_batch + self.rank * local
            yield from order[start:start + local]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.skip_batches) * self.batch_size


def make_train_loader(train_set: Any, sampler: ResumableSampler, config: dict[str, Any], pad_id: int,
                      pin_memory: bool = False) -> DataLoader:
    """The training DataLoader. It has its own generator: starting an epoch's iterator must not
    draw from the global torch RNG, whose state a mid-epoch checkpoint has already saved (else a
    resumed run's dropout would be one draw out of step)."""
    import data

    return DataLoader(train_set, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                      num_workers=config["workers"], pin_memory=pin_memory,
                      collate_fn=functools.partial(data.collate, pad_id=pad_id),
                      generator=torch.Generator().manual_seed(config["seed"]))


# ----------------------------------------------------------------------------- state

def rng_state() -> dict[str, Any]:
    """Every random generator the run touches, in types `torch.load(weights_only=True)` accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [],  # this process's GPU
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state(state["cuda"][0])


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
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in requirements.txt, but a bare machine may lack it
                self.line("note: tensorboard is not installed (pip install tensorboard): train.log only")
            else:
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


def _text_states(text_encoder: torch.nn.Module, split: Any, tokenizer: Any, config: dict[str, Any],
                 world: Dist, log: "RunLog") -> Any:
    """The training captions' frozen-BERT states (text_cache.py), or None where the run has no
    frozen BERT layers or the cache is off. Rank 0 computes a missing cache; the others wait
    and read it."""
    import text_cache

    folder = text_cache.cache_dir(config["text_state_cache"])
    if config["text_encoder"] != "bert" or config["bert_frozen_layers"] == 0 or folder is None:
        return None
    start = time.perf_counter()
    token_ids = [tokenizer.encode(caption) for caption in split.captions]

    def compute() -> Any:
        return text_cache.frozen_text_states(text_encoder, token_ids, folder, world.device,
                                             batch_size=config["eval_batch_size"],
                                             progress=config["progress"] and world.is_main)

    states = compute() if world.is_main else None
    if world.world_size > 1:
        dist.barrier()
        states = states if world.is_main else compute()
    log.line(f"frozen BERT states of {len(token_ids)} training captions ({config['bert_frozen_layers']} layers) "
             f"from {folder} in {time.perf_counter() - start:.0f} s")
    return states


def validate(model: torch.nn.Module, split: Any, tokenizer: Any, graph: Any, config: dict[str, Any],
             device: torch.device, protocol: str = "f30k") -> dict[str, Any]:
    """Retrieval metrics of the current query encoders on a split (mu from the config)."""
    import evaluation

    return evaluation.evaluate(model, split, tokenizer, graph, device, config["mu"], protocol=protocol,
                               batch_size=config["eval_batch_size"], num_workers=config["workers"])


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
                     "eval_batch_size", "val_every_steps", "checkpoint_every_steps", "test_split", "dist_timeout",
                     "bert_length_groups", "text_state_cache", "diag_every", "data_path")


def resumed_config(config: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """The checkpoint's config, with the command line's changes to `RESUME_MAY_CHANGE` only
    (options newer than the checkpoint take the script's defaults)."""
    saved = load_checkpoint(config["resume"])["config"]
    refused = sorted(k for k in explicit if k not in RESUME_MAY_CHANGE and config[k] != saved.get(k, config[k]))
    if refused:
        raise CoderError(f"{config['resume']}: a resumed run keeps its configuration; cannot change "
                         f"{', '.join('--' + k for k in refused)} (allowed: "
                         f"{', '.join('--' + k for k in RESUME_MAY_CHANGE[1:])})")
    return {**config, **saved, **{k: config[k] for k in explicit if k in RESUME_MAY_CHANGE},
            "resume": config["resume"]}


def train(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Train one run described by a full config (see train_f30k.py); returns the test metrics."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if config["batch_size"] < 1 or config["batch_size"] % processes:
        raise CoderError(f"--batch_size {config['batch_size']} (the global batch) is not divisible by the "
                         f"{processes} processes; each process takes batch_size / processes")
    world = Dist(config["device"], config.get("dist_timeout", 60.0))
    try:
        return _train(config, dataset, world)
    finally:
        world.close()


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def _amp_dtype(config: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """The autocast dtype: on CUDA, "auto" is bf16 where the GPU supports it, else fp16 (with a
    GradScaler); on CPU, "auto" is off and "bf16" is CPU autocast (fp16 needs CUDA)."""
    amp = config["amp"]
    if amp not in AMP_CHOICES:
        raise CoderError(f"--amp {amp}: expected one of {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp == "fp16":
            raise CoderError("--amp fp16 needs CUDA; on CPU use --amp bf16 or off")
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _ddp_buffer_kwargs() -> dict[str, bool]:
    """DDP arguments for: buffers broadcast from rank 0 once at construction (so every process
    starts with rank 0's queues and prototypes), never at each forward (the model keeps them
    equal by construction). Newer PyTorch spells this forward_sync_buffers=False;
    broadcast_buffers=False (older PyTorch) also skips the construction-time broadcast."""
    if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _must_agree(name: str) -> bool:
    """State every process must hold identically: weights, momentum weights, queues,
    prototypes. BatchNorm running statistics are per process unless SyncBatchNorm (CUDA)."""
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _check_replicas(raw_model: torch.nn.Module, world: Dist, log: RunLog) -> None:
    """Compare a fingerprint of every tensor that must agree across processes; if any differs
    (a bug or a non-deterministic kernel), log it and copy rank 0's state to every process."""
    if world.world_size == 1:
        return
    state = {k: v for k, v in raw_model.state_dict().items() if _must_agree(k)}
    prints = torch.stack([torch.stack([v.double().sum(), v.double().abs().sum()]) for v in state.values()])
    prints = prints.to(world.device)
    everyone = [torch.empty_like(prints) for _ in range(world.world_size)]
    dist.all_gather(everyone, prints)
    differ = torch.stack([(p != everyone[0]).any(1) for p in everyone]).any(0).tolist()
    if any(differ):
        names = [k for k, d in zip(state, differ) if d]
        log.line(f"warning: processes disagree on {len(names)} tensors ({', '.join(names[:6])}); "
                 f"re-synchronised from rank 0")
        for name in names:
            dist.broadcast(state[name], src=0)
        if hasattr(raw_model, "refresh_queue_kernel"):  # consistent with rank 0's queues and prototypes
            raw_model.refresh_queue_kernel()


def _compile_encoders(raw_model: torch.nn.Module) -> None:
    """torch.compile (in place, so state-dict keys do not change) the region and text encoders,
    online and momentum copies: they hold nearly all the FLOPs. The queue, Sinkhorn and
    prototype bookkeeping stays eager: its sizes change while the queues fill up, and the
    prototype update picks data-dependent columns (each would trigger a recompilation)."""
    names = ("image_encoder", "text_encoder")
    encoders = [getattr(raw_model, n) for n in names] + [raw_model.momentum[n] for n in names if n in raw_model.momentum]
    for module in encoders:
        module.compile()


def term_gradient_norms(raw_model: torch.nn.Module, terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The gradient norm of each weighted loss term on each shared instance encoder (the
    modules every term reaches), this process's batch only: which objective trains the
    encoders. One extra backward pass per term."""
    modules = {name: [p for p in getattr(raw_model, name).parameters() if p.requires_grad]
               for name in ("image_encoder", "text_encoder")}
    params = [p for group in modules.values() for p in group]
    norms = {}
    for key, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        start = 0
        for name, group in modules.items():
            squares = [g.float().pow(2).sum() for g in grads[start:start + len(group)] if g is not None]
            norms[f"grad/{name}/{key}"] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
            start += len(group)
    return norms


def training_step(forward: Any, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, batch: dict[str, torch.Tensor], amp_dtype: torch.dtype | None,
                  grad_clip: float, world: Dist, term_norms: dict[str, float] | None = None
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step: forward (`forward` is the model or its DDP wrapper) under autocast,
    backward (DDP averages the gradients), unscale and clip (the same global norm on every
    process), step, then the model's after_optimizer_step (momentum encoders, prototypes,
    queues). Returns this process's losses and the gradient norm; given a dict `term_norms`,
    fills it with `term_gradient_norms` first. (bench/bench_throughput.py times exactly this
    function.)"""
    device_type = next(raw_model.parameters()).device.type
    with torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else nullcontext():
        if term_norms is None:
            losses = forward(batch)
        else:
            losses, terms = forward(batch, return_terms=True)
    if term_norms is not None:
        term_norms.update(term_gradient_norms(raw_model, terms))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    raw_model.after_optimizer_step()
    return losses, grad_norm


def _train(config: dict[str, Any], dataset: str, world: Dist) -> dict[str, Any]:
    resume_state = load_checkpoint(config["resume"]) if config["resume"] else None
    device = world.device
    amp_dtype = _amp_dtype(config, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config["tf32"]
        torch.backends.cudnn.allow_tf32 = config["tf32"]
    seed_everything(config["seed"])

    # Rank 0 owns the run folder; a refusal there (existing checkpoints) stops every process.
    run_dir, refusal = None, None
    if world.is_main:
        try:
            run_dir = prepare_run_dir(config, dataset, resume_state)
        except CoderError as err:
            refusal = str(err)
    refusal = world.broadcast(refusal)
    if refusal:
        raise CoderError(refusal)
    log = RunLog(run_dir if world.is_main else None)
    data = load_data(config, resume_state.get("vocab_words") if resume_state else None)
    train_split, tokenizer, graph = data["train"], data["tokenizer"], data["graph"]
    model = build_model(config, train_split.feature_dim, len(data["vocab_words"] or []), graph).to(device)
    if world.world_size > 1 and config["batch_norm"]:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.line("note: BatchNorm statistics are per process on CPU (SyncBatchNorm needs CUDA); "
                     "use --batch_norm false for exact one-process equivalence")
    if config["word_vectors"] and config["text_encoder"] == "bigru" and resume_state is None:
        coverage = model.init_word_embeddings(data["vocab_words"])
        log.line(f"word embeddings from {config['word_vectors']}: {coverage:.1%} of the vocabulary covered")
    if world.rank > 0:
        # Same initial weights on every process (seeded above; DDP also broadcasts rank 0's),
        # but each process draws its own dropout masks from here on; rank 0 keeps the
        # one-process random stream.
        seed_everything(config["seed"] + 1000003 * world.rank)
    optimizer = torch.optim.AdamW(model.param_groups(config["lr"], config["weight_decay"],
                                                     config["bert_lr_scale"]))
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    local_batch = config["batch_size"] // world.world_size
    from data import PairDataset

    text_states = _text_states(model.text_encoder, train_split, tokenizer, config, world, log)
    train_set = PairDataset(train_split, tokenizer, graph, text_states=text_states)
    sampler = ResumableSampler(len(train_set), world.world_size, world.rank, config["seed"], local_batch)
    loader = make_train_loader(train_set, sampler, config, tokenizer.pad_id, pin_memory=device.type == "cuda")
    steps_per_epoch = len(train_set) // world.world_size // local_batch
    if steps_per_epoch == 0:
        raise CoderError(f"{config['data_path']}: {len(train_set)} training captions do not fill one "
                         f"batch of {config['batch_size']}")

    epoch, step_in_epoch, global_step, best_rsum = 0, 0, 0, -math.inf
    if resume_state is not None:
        load_state_strict(model, resume_state["model"], config["resume"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler.is_enabled() and resume_state["scaler"]:  # empty when saved without fp16
            scaler.load_state_dict(resume_state["scaler"])
        epoch, step_in_epoch = resume_state["epoch"], resume_state["step_in_epoch"]
        global_step, best_rsum = resume_state["global_step"], resume_state["best_rsum"]
        saved_rngs = resume_state["rng"]
        if len(saved_rngs) == world.world_size:
            set_rng_state(saved_rngs[world.rank])  # each process continues its own random streams
        else:
            log.line(f"note: checkpoint written by {len(saved_rngs)} processes, resumed with "
                     f"{world.world_size}: same data order, but random streams (dropout) differ")
            if world.rank < len(saved_rngs):
                set_rng_state(saved_rngs[world.rank])

    raw_model = model
    if world.world_size > 1:
        # Only the online encoders train; momentum copies have requires_grad=False, so DDP
        # leaves them alone. Frozen BERT epochs leave parameters without a gradient.
        model = torch.nn.parallel.DistributedDataParallel(
            raw_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config["freeze_bert_epochs"] > 0 and config["text_encoder"] == "bert",
            **_ddp_buffer_kwargs())
    if config["compile"]:
        _compile_encoders(raw_model)
    forward = model

    version = code_version()
    if world.is_main:
        (run_dir / "config.json").write_text(json.dumps({**config, "code_version": version}, indent=2))
        log.line(f"run {run_dir} | code {version} | device {device} x{world.world_size} | "
                 f"batch {config['batch_size']} ({local_batch} per process) | "
                 f"amp {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'} | "
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
        _check_replicas(raw_model, world, log)  # collective under DDP: every process calls save
        state = checkpoint_state()
        if world.is_main:
            save_checkpoint(run_dir / name, state)

    def validate_and_keep_best() -> None:
        """Validate on rank 0 (one similarity matrix over the dev images, whatever the
        dataset), share the score with every process, save `best.pt` on improvement."""
        nonlocal best_rsum
        rsum = None
        if world.is_main:
            metrics = validate(raw_model, data["val"], data["tokenizer"], data["graph"], config, device)
            log.scalars({f"val/{k}": v for k, v in metrics.items()}, global_step)
            log.line(f"validation at step {global_step}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
            rsum = metrics["rsum"]
        rsum = world.broadcast(rsum)
        if rsum > best_rsum:
            best_rsum = rsum
            save("best.pt")
            log.line(f"new best rsum {rsum:.2f}: best.pt saved")

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
            term_norms = {} if config["diag_every"] and (global_step + 1) % config["diag_every"] == 0 else None
            losses, grad_norm = training_step(forward, raw_model, optimizer, scaler, batch, amp_dtype,
                                              config["grad_clip"], world, term_norms)
            global_step += 1
            step_in_epoch += 1
            window_items += config["batch_size"]

            # Averaged over processes: the global-batch loss, the same on every process.
            mean_losses = world.mean(losses)
            if not math.isfinite(mean_losses["loss"]):
                raise CoderError(f"training diverged at step {global_step} (loss {mean_losses['loss']}); "
                                 f"try a lower --lr or --amp off")
            if term_norms:
                log.scalars(term_norms, global_step)
                if world.is_main:
                    log.line(f"gradient norms at step {global_step} (rank 0's batch): "
                             + " ".join(f"{k}={v:.4g}" for k, v in term_norms.items()))
            if global_step % config["log_every"] == 0 or step_in_epoch == steps_per_epoch:
                values = {(f"diag/{k[5:]}" if k.startswith("diag_") else f"loss/{k}"): v
                          for k, v in mean_losses.items()}
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
                validate_and_keep_best()
                model.train()
            if config["checkpoint_every_steps"] and global_step % config["checkpoint_every_steps"] == 0 \
                    and step_in_epoch < steps_per_epoch:
                save("last.pt")
                log.line(f"step checkpoint saved: epoch {epoch + 1} step {step_in_epoch} (global {global_step})")
        bar.close()
        epoch, step_in_epoch = epoch + 1, 0
        validate_and_keep_best()
        save("last.pt")
        log.line(f"epoch {epoch} done; checkpoint saved")

    if world.is_main and config["test_split"]:
        metrics = _final_test(run_dir, config, device, dataset, log)
    log.close()
    return metrics


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
    metrics = validate(model, split, tokenizer, graph, saved_config, device, protocol=dataset)
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    log.line(f"test split '{config['test_split']}' with best.pt:\n" + evaluation.format_table(metrics))
    return metrics
