"""The one training loop behind train_f30k.py and train_coco.py.

A run is a flat config dict (the variables at the top of a train script, overridden from
the command line). `run(defaults, argv)` parses the overrides, sets up devices (and
torchrun/DDP when launched that way), trains with step and epoch checkpoints, validates on
dev, and can resume from any checkpoint at the exact step it was written.
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from checkpoint import (
    build_model,
    check_checkpoint_contents,
    check_resume_contents,
    code_version,
    concept_graph_state,
    load_checkpoint,
    load_state_strict,
    resumed_config,
    save_checkpoint,
    text_encoder_files,
)
from diagnostics import step_diagnostics, term_gradient_norms
from distributed import Dist, ResumableSampler, check_replicas, ddp_buffer_kwargs, leave_worker
from options import (
    CHOICES,
    DEMO_OVERRIDES,
    check_train_config,
    check_training_memory,
    check_writable_dir,
    parse_overrides,
    script_help,
)
from utils import CoderError, as_numpy, atomic_write

PROJECT_ROOT = Path(__file__).resolve().parent


def make_train_loader(
    train_set: Any, sampler: ResumableSampler, config: dict[str, Any], pad_id: int, pin_memory: bool = False
) -> DataLoader:
    """The training DataLoader. It has its own generator: starting an epoch's iterator must not
    draw from the global torch RNG, whose state a mid-epoch checkpoint has already saved (else a
    resumed run's dropout would be one draw out of step)."""
    import data

    return DataLoader(
        train_set,
        batch_size=sampler.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=config["workers"],
        pin_memory=pin_memory,
        collate_fn=functools.partial(data.collate, pad_id=pad_id),
        generator=torch.Generator().manual_seed(config["seed"]),
    )


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
        # a folder name that is not UTF-8 is logged escaped, as the terminal shows it
        self.file = open(run_dir / "train.log", "a", encoding="utf-8", errors="backslashreplace") if run_dir else None
        self.tb = None
        if run_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in requirements.txt, but a bare machine may lack it
                self.line("note: tensorboard is not installed (pip install tensorboard): train.log only")
            else:
                try:
                    self.tb = SummaryWriter(str(run_dir / "tensorboard"))
                except UnicodeEncodeError:  # it writes only under folder names that are UTF-8
                    self.line(
                        f"note: TensorBoard cannot write under {run_dir}, a name that is not UTF-8: train.log only"
                    )

    def line(self, text: str) -> None:
        if self.file is None:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            self.file.write(f"{stamp} {text}\n")
            self.file.flush()
        except OSError as err:  # a full disk: name the log, not a traceback from deep in the loop
            raise CoderError(f"{self.file.name}: cannot write ({err.strerror or err})") from None
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


# What a run writes into its folder: a folder holding any of it is another run's.
RUN_OUTPUTS = ("*.pt", "config.json", "train.log", "test_metrics.json", "tensorboard")


def prepare_run_dir(config: dict[str, Any], dataset: str, resume_state: dict[str, Any] | None) -> tuple[Path, bool]:
    """The run folder (the resumed run's, a new timestamped one, or the user's; never clobbered)
    and whether this call made it."""
    if config["run_dir"]:
        run_dir = Path(config["run_dir"])
    elif resume_state is not None:
        run_dir = Path(config["resume"]).resolve().parent
    else:
        run_dir = PROJECT_ROOT / "runs" / f"{dataset}_{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise CoderError(f"--run_dir {run_dir}: is a file, not a folder")
    found = sorted({p.name for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern)}) if run_dir.is_dir() else []
    resuming_here = resume_state is not None and Path(config["resume"]).resolve().parent == run_dir.resolve()
    if found and not resuming_here and not config["overwrite"]:
        raise CoderError(
            f"{run_dir}: run folder already holds another run's {', '.join(found[:4])}; pick another "
            f"--run_dir, resume with --resume, or pass --overwrite true"
        )
    check_writable_dir(run_dir, "--run_dir")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CoderError(f"--run_dir {run_dir}: cannot create the run folder ({err.strerror or err})") from None
    hold_run_dir(run_dir)
    return run_dir, created


LOCK_FILE = ".lock"  # in a run folder: locked by the process that trains there, and holding its pid
_held_run_dirs: list[int] = []  # this process's locks (file descriptors), released when its training ends


def hold_run_dir(run_dir: Path) -> None:
    """Hold the run folder while this process trains in it, with an flock on its LOCK_FILE: a
    second run or resume there meanwhile (whose checkpoints and log would interleave) is
    refused, naming the holder. The kernel drops the lock when the process ends, killed or not,
    so a crash never leaves the folder locked."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise CoderError(
            f"{run_dir}: another process (pid {holder}) is training in this run folder; wait for it "
            f"to end, or pick another --run_dir"
        ) from None
    except OSError:  # a file system without locks (some network mounts): train unguarded
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_run_dirs.append(fd)


def release_run_dirs() -> None:
    """Let go of the run folders this process holds (its training has ended)."""
    while _held_run_dirs:
        os.close(_held_run_dirs.pop())


def load_data(config: dict[str, Any], resume_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Splits, tokenizer and concept graph of a run (a resumed run's vocabulary, BERT tokenizer
    and config, and concept graph come from its checkpoint, so their files may have moved)."""
    import concepts
    import data
    import vocab
    from checkpoint import TEXT_ENCODER_FILES, concept_graph_from_state, text_encoder_parts

    graph = None
    if config["concept_branch"]:
        saved_graph = resume_state.get("concept_graph") if resume_state else None
        graph = concept_graph_from_state(saved_graph) if saved_graph else concepts.load_concepts(config["concept_path"])
        graph.require_edges(config["concept_threshold"], config["concept_path"])
    need_vocab_words = resume_state.get("vocab_words") if resume_state else None
    bert_config = text_files = None  # a fresh bert run loads BERT from bert_path
    if config["text_encoder"] == "bert" and resume_state is not None:
        (tokenizer, bert_config), vocab_words = text_encoder_parts(resume_state, config, config["resume"]), None
        text_files = resume_state.get(TEXT_ENCODER_FILES)
    elif config["text_encoder"] == "bert":
        tokenizer, vocab_words = vocab.BertTokenizer(config["bert_path"]), None
    elif need_vocab_words:
        tokenizer, vocab_words = vocab.Vocabulary.from_words(need_vocab_words), need_vocab_words
    else:
        tokenizer = vocab.require_words(vocab.Vocabulary.load(config["vocab_path"]), config["vocab_path"])
        vocab_words = list(tokenizer.idx2word)
    train = data.load_split(config["data_path"], config["train_split"])
    val = data.load_split(config["data_path"], config["val_split"], max_images=config["val_max_images"] or None)
    text_source = config["vocab_path"] if config["text_encoder"] == "bigru" else config["bert_path"]
    vocab.require_known_words(tokenizer, train.captions, config["resume"] or text_source)
    if graph is not None:
        graph.require_labels(train.captions, config["resume"] or config["concept_path"])
    return {
        "train": train,
        "val": val,
        "tokenizer": tokenizer,
        "graph": graph,
        "vocab_words": vocab_words,
        "fingerprint": data.data_fingerprint(train),
        "val_fingerprint": data.data_fingerprint(val, all_rows=True),
        "bert_config": bert_config,
        "text_encoder_files": text_files,
    }


def _text_states(
    text_encoder: torch.nn.Module,
    split: Any,
    tokenizer: Any,
    config: dict[str, Any],
    world: Dist,
    log: "RunLog",
    every_process: bool = True,
) -> Any:
    """A split's frozen-BERT states (text_cache.py), or None where the run has no frozen BERT
    layers or the cache is off. Rank 0 computes a missing cache; with `every_process` the others
    wait and read it (the training split), otherwise they get None (the validation split, which
    only rank 0 encodes)."""
    import text_cache

    folder = text_cache.cache_dir(config["text_state_cache"], config["data_path"])
    if config["text_encoder"] != "bert" or config["bert_frozen_layers"] == 0 or folder is None:
        return None
    if not (world.is_main or every_process):
        return None
    start = time.perf_counter()
    token_ids = [tokenizer.encode(caption) for caption in split.captions]

    def compute() -> Any:
        return text_cache.frozen_text_states(
            text_encoder,
            token_ids,
            folder,
            world.device,
            batch_size=config["eval_batch_size"],
            progress=config["progress"] and world.is_main,
        )

    states = compute() if world.is_main else None
    if world.world_size > 1 and every_process:
        dist.barrier()
        states = states if world.is_main else compute()
    log.line(
        f"frozen BERT states of {len(token_ids)} captions of split '{split.split}' "
        f"({config['bert_frozen_layers']} layers) from {folder} in {time.perf_counter() - start:.0f} s"
    )
    return states


def validate(
    model: torch.nn.Module,
    split: Any,
    tokenizer: Any,
    graph: Any,
    config: dict[str, Any],
    device: torch.device,
    protocol: str = "f30k",
    text_states: Any = None,
    ranks_file: Path | None = None,
) -> dict[str, Any]:
    """Retrieval metrics of the current query encoders on a split (mu from the config); with
    `text_states` the frozen BERT bottom is read from them instead of run again. With a concept
    branch, "instance_rsum" is the rsum of the instance embeddings alone (mu = 0); a matrix of
    equal scores (a collapsed model) adds "collapsed" = 1. `ranks_file` (.npz) gets each
    image's and caption's rank, the input of bench/stats.py's bootstrap."""
    import evaluation

    embeddings = evaluation.encode_split(
        model,
        split,
        tokenizer,
        graph,
        device,
        batch_size=config["eval_batch_size"],
        num_workers=config["workers"],
        text_states=text_states,
    )
    sims = evaluation.ensemble_similarity([embeddings], config["mu"], device)
    metrics = evaluation.protocol_metrics(sims, protocol, embeddings.captions_per_image)
    if embeddings.image_concept is not None and config["mu"] > 0 and "rsum" in metrics:
        instance = evaluation.ensemble_similarity([embeddings], 0.0, device)
        metrics["instance_rsum"] = evaluation.recall_metrics(instance, embeddings.captions_per_image)["rsum"]
    if evaluation.constant_scores(sims):
        metrics["collapsed"] = 1.0
    if ranks_file is not None:
        image_ranks, caption_ranks = evaluation.retrieval_ranks(sims, embeddings.captions_per_image)
        ranks = {"image_ranks": as_numpy(image_ranks), "caption_ranks": as_numpy(caption_ranks)}
        atomic_write(ranks_file, lambda handle: np.savez_compressed(handle, **ranks), mode="wb")
    return metrics


def run(defaults: dict[str, Any], argv: list[str], dataset: str) -> dict[str, Any]:
    """Parse the command line over a script's defaults, check every value and named file, and
    train; returns the final metrics (none for --help)."""
    if {"-h", "--help"} & set(argv):
        print(script_help(defaults, Path(__file__).with_name(f"train_{dataset}.py")))
        return {}
    config, demo, explicit = parse_overrides(defaults, argv)
    if config["resume"]:
        config = resumed_config(config, explicit)
    if demo:
        from demo_data import make_demo_dataset

        make_demo_dataset(Path(DEMO_OVERRIDES["data_path"]).parent, seed=0)
    check_train_config(config, resuming=bool(config["resume"]))
    metrics = train(config, dataset)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_worker()
    return metrics


def train(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Train one run described by a full config (see train_f30k.py); returns the test metrics."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if config["batch_size"] < 1 or config["batch_size"] % processes:
        raise CoderError(
            f"--batch_size {config['batch_size']} (the global batch) is not divisible by the "
            f"{processes} processes; each process takes batch_size / processes"
        )
    if config["batch_norm"] and config["batch_size"] // processes < 2:
        raise CoderError(
            f"--batch_size {config['batch_size']} over {processes} processes leaves one sample per process, "
            f"and BatchNorm needs at least 2; use a batch of at least {2 * processes} or --batch_norm false"
        )
    world = Dist(config["device"], config["dist_timeout"])
    try:
        return _train(config, dataset, world)
    finally:
        world.close()
        release_run_dirs()


def _amp_dtype(config: dict[str, Any], device: torch.device) -> torch.dtype | None:
    """The autocast dtype: on CUDA, "auto" is bf16 where the GPU supports it, else fp16 (with a
    GradScaler); on CPU, "auto" is off and "bf16" is CPU autocast (fp16 needs CUDA)."""
    amp = config["amp"]
    if amp not in CHOICES["amp"]:
        raise CoderError(f"--amp {amp}: expected one of {', '.join(CHOICES['amp'])}")
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


def _compile_encoders(raw_model: torch.nn.Module) -> None:
    """torch.compile (in place, so state-dict keys do not change) the region and text encoders,
    online and momentum copies: they hold nearly all the FLOPs. The queue, Sinkhorn and
    prototype bookkeeping stays eager: its sizes change while the queues fill up (each size
    would trigger a recompilation)."""
    names = ("image_encoder", "text_encoder")
    encoders = [getattr(raw_model, n) for n in names] + [
        raw_model.momentum[n] for n in names if n in raw_model.momentum
    ]
    for module in encoders:
        module.compile()


def online_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters without the momentum copies (they never get an optimizer)."""
    return [(name, p) for name, p in model.named_parameters() if not name.startswith("momentum.")]


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, bert_lr_scale: float) -> list[dict[str, Any]]:
    """AdamW groups of the online parameters: "main" at lr and, with the bert text encoder,
    "bert" at lr·bert_lr_scale (frozen BERT weights included: they simply get no gradient)."""
    main, bert = [], []
    for name, p in online_parameters(model):
        (bert if name.startswith("text_encoder.bert.") else main).append(p)
    groups = [{"name": "main", "params": main, "lr": lr, "weight_decay": weight_decay}]
    if bert:
        groups.append({"name": "bert", "params": bert, "lr": lr * bert_lr_scale, "weight_decay": weight_decay})
    return groups


def parameter_branches(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """The online parameters by branch: "instance" (the two encoders), "concept" (GCN and
    queries) and, when learned, "prototypes" (see `clip_gradients`)."""
    branches: dict[str, list[torch.nn.Parameter]] = {"instance": [], "concept": [], "prototypes": []}
    for name, p in online_parameters(model):
        if name.startswith(("image_encoder.", "text_encoder.")):
            branches["instance"].append(p)
        elif name.startswith("prototypes."):
            branches["prototypes"].append(p)
        else:
            branches["concept"].append(p)
    return {k: v for k, v in branches.items() if v}


def clip_gradients(raw_model: torch.nn.Module, max_norm: float, scope: str) -> torch.Tensor:
    """Clip the gradient norm to `max_norm`: of all parameters together ("global"),
    or of each branch on its own ("branch": the instance encoders, the concept branch, learned
    prototypes), so that a branch with large gradients cannot scale down another's updates.
    Returns the norm of all gradients before clipping."""
    if scope == "global":
        return torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
    norms = [torch.nn.utils.clip_grad_norm_(params, max_norm) for params in parameter_branches(raw_model).values()]
    return torch.linalg.vector_norm(torch.stack(norms))


def training_step(
    forward: Any,
    raw_model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batch: dict[str, torch.Tensor],
    amp_dtype: torch.dtype | None,
    grad_clip: float,
    *,
    clip_scope: str,
    term_norms: dict[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step: forward (`forward` is the model or its DDP wrapper; it also moves
    the momentum encoders, queues and prototypes) under autocast, backward (DDP averages the
    gradients), unscale and clip (`clip_scope`, see clip_gradients; the same norms on every
    process), step. Returns this process's losses (detached) and the gradient norm; given a
    dict `term_norms`, fills it with `term_gradient_norms` first. (bench/bench_throughput.py
    times exactly this function.)"""
    device_type = next(raw_model.parameters()).device.type
    with torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else nullcontext():
        losses = forward(batch)
    if term_norms is not None:
        term_norms.update(term_gradient_norms(raw_model, losses))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(losses["loss"]).backward()
    scaler.unscale_(optimizer)
    grad_norm = clip_gradients(raw_model, grad_clip, clip_scope)
    scaler.step(optimizer)
    scaler.update()
    return {name: value.detach() for name, value in losses.items()}, grad_norm


class TrainingRun:
    """One training run, set up from a full config: run folder, log, data, model, optimizer,
    loader, and the state of a resumed checkpoint. `fit()` trains to the last epoch."""

    def __init__(self, config: dict[str, Any], dataset: str, world: Dist) -> None:
        self.config, self.dataset, self.world = config, dataset, world
        resume_state = load_checkpoint(config["resume"]) if config["resume"] else None
        if resume_state is not None:
            check_checkpoint_contents(config["resume"], resume_state)
            check_resume_contents(config["resume"], resume_state)
        self.device = world.device
        self.amp_dtype = _amp_dtype(config, self.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config["tf32"]
            torch.backends.cudnn.allow_tf32 = config["tf32"]
        seed_everything(config["seed"])
        self.run_dir, created = self._run_folder(resume_state)
        self.log = RunLog(self.run_dir if world.is_main else None)
        self.last_saved: tuple[Path, int] | None = None  # last.pt and its global step
        try:
            self._set_up(resume_state)
        except BaseException:
            self.log.close()
            if created:  # a failed start leaves no empty run folder behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _set_up(self, resume_state: dict[str, Any] | None) -> None:
        config = self.config
        self.data = load_data(config, resume_state)
        local_batch = config["batch_size"] // self.world.world_size
        split = self.data["train"]
        self.steps_per_epoch = split.num_captions // self.world.world_size // local_batch
        if self.steps_per_epoch == 0:
            raise CoderError(
                f"{split.captions_path}: {split.num_captions} training captions do not fill one "
                f"batch of {config['batch_size']}; lower --batch_size"
            )
        if resume_state is not None:
            self._check_resumable(resume_state)  # before the model, the text-state cache and the loader
        self.model = self._build_model(resume_state is None)
        if resume_state is not None:  # its weights before the text-state cache runs the frozen BERT bottom
            load_state_strict(self.model, resume_state["model"], config["resume"])
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, config["lr"], config["weight_decay"], config["bert_lr_scale"])
        )
        for group in self.optimizer.param_groups:
            group["base_lr"] = group["lr"]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._build_loader()
        self.epoch, self.step_in_epoch, self.global_step, self.best_rsum = 0, 0, 0, -math.inf
        if resume_state is not None:
            self._restore(resume_state)
        self.forward = self._wrap_model()
        self.version = code_version()
        self._log_start()

    # -- set-up --------------------------------------------------------------------------------

    def _run_folder(self, resume_state: dict[str, Any] | None) -> tuple[Path | None, bool]:
        """Rank 0 owns the run folder (and whether it made it); a refusal there (existing
        results) stops every process."""
        run_dir, created, refusal = None, False, None
        if self.world.is_main:
            try:
                run_dir, created = prepare_run_dir(self.config, self.dataset, resume_state)
            except CoderError as err:
                refusal = str(err)
        refusal = self.world.broadcast(refusal)
        if refusal:
            raise CoderError(refusal)
        return run_dir, created

    def _build_model(self, fresh: bool) -> torch.nn.Module:
        config, world = self.config, self.world
        train_split, graph = self.data["train"], self.data["graph"]
        check_training_memory(
            config,
            train_split.region_count,
            train_split.feature_dim,
            len(self.data["vocab_words"] or []),
            *device_memory(self.device),
        )
        model = build_model(
            config,
            train_split.feature_dim,
            len(self.data["vocab_words"] or []),
            graph,
            bert_config=self.data["bert_config"],
        ).to(self.device)
        if config["text_encoder"] == "bert" and self.data["text_encoder_files"] is None:
            self.data["text_encoder_files"] = text_encoder_files(
                self.data["tokenizer"].tokenizer, model.text_encoder.bert.config
            )
        if world.world_size > 1 and config["batch_norm"]:
            if self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                self.log.line(
                    "note: BatchNorm statistics are per process on CPU (SyncBatchNorm needs CUDA); "
                    "use --batch_norm false for exact one-process equivalence"
                )
        if config["word_vectors"] and config["text_encoder"] == "bigru" and fresh:
            coverage = model.init_word_embeddings(self.data["vocab_words"])
            self.log.line(f"word embeddings from {config['word_vectors']}: {coverage:.1%} of the vocabulary covered")
        if world.rank > 0:
            # Same initial weights on every process (seeded above; DDP also broadcasts rank 0's),
            # but each process draws its own dropout masks from here on; rank 0 keeps the
            # one-process random stream.
            seed_everything(config["seed"] + 1000003 * world.rank)
        return model

    def _build_loader(self) -> None:
        from data import PairDataset

        config, world = self.config, self.world
        local_batch = config["batch_size"] // world.world_size
        tokenizer, graph, split = self.data["tokenizer"], self.data["graph"], self.data["train"]
        # the validation split's first: rank 0 builds both before the barrier the others wait at
        self.val_text_states = _text_states(
            self.model.text_encoder, self.data["val"], tokenizer, config, world, self.log, every_process=False
        )
        text_states = _text_states(self.model.text_encoder, split, tokenizer, config, world, self.log)
        self.train_set = PairDataset(split, tokenizer, graph, text_states=text_states)
        self.sampler = ResumableSampler(len(self.train_set), world.world_size, world.rank, config["seed"], local_batch)
        self.loader = make_train_loader(
            self.train_set, self.sampler, config, tokenizer.pad_id, pin_memory=self.device.type == "cuda"
        )

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """A checkpoint continues only on the data it was trained on (which may have moved);
        a folder moved since it was written is where the run continues."""
        resume, saved_config = self.config["resume"], state["config"]
        saved, now = state.get("data_fingerprint"), self.data["fingerprint"]
        where = Path(self.config["data_path"]) / f"{self.config['train_split']}_*"
        if saved is None:
            self.log.line(
                f"note: {resume} predates data fingerprints; cannot check that {where} is the data it was trained on"
            )
        elif saved != now:
            raise CoderError(
                f"{resume}: trained on other data ({_describe_data(saved)}) than {where} holds "
                f"({_describe_data(now)}); resume with the run's own data, or start a new run"
            )
        elif Path(saved_config["data_path"]).resolve() != Path(self.config["data_path"]).resolve():
            self.log.line(
                f"note: the training data moved from {saved_config['data_path']} to "
                f"{self.config['data_path']} (same content)"
            )
        if state["step_in_epoch"] > self.steps_per_epoch:
            raise CoderError(
                f"{resume}: written at step {state['step_in_epoch']} of an epoch, but an epoch of "
                f"{where} has {self.steps_per_epoch} steps at batch {self.config['batch_size']} over "
                f"{self.world.world_size} process(es); resume with the run's own data, batch size "
                f"and process count"
            )
        saved_dir = saved_config.get("run_dir")
        if saved_dir and self.run_dir is not None and Path(saved_dir).resolve() != self.run_dir.resolve():
            self.log.line(f"note: the run folder moved from {saved_dir}; the run continues in {self.run_dir}")
        # a best dev score measured on other dev data is no bar to clear: the best starts afresh
        saved_val, now_val = state.get("val_fingerprint"), self.data["val_fingerprint"]
        if saved_val is not None and "rows" not in saved_val:  # written when three rows were hashed
            import data

            now_val = data.data_fingerprint(self.data["val"])
        self.dev_data_changed = saved_val is not None and saved_val != now_val
        if self.dev_data_changed:
            self.log.line(
                f"note: the validation data changed since {resume} was written ({_describe_data(saved_val)}; "
                f"now {_describe_data(now_val)}): its best dev rsum {state['best_rsum']:.2f} is not "
                f"comparable, so the next validation makes the new best.pt"
            )

    def _restore(self, state: dict[str, Any]) -> None:
        """The optimizer, counters and random streams of a checkpoint (its weights are loaded
        with the model)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state["scaler"]:  # empty when saved without fp16
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.best_rsum = state["global_step"], state["best_rsum"]
        if self.dev_data_changed:
            self.best_rsum = -math.inf
        saved_rngs, world = state["rng"], self.world
        if len(saved_rngs) == world.world_size:
            set_rng_state(saved_rngs[world.rank])  # each process continues its own random streams
        else:
            self.log.line(
                f"note: checkpoint written by {len(saved_rngs)} processes, resumed with "
                f"{world.world_size}: same data order, but random streams (dropout) differ"
            )
            if world.rank < len(saved_rngs):
                set_rng_state(saved_rngs[world.rank])
        self.log.line(
            f"resumed from {self.config['resume']} at epoch {self.epoch + 1}, step {self.step_in_epoch} "
            f"of {self.steps_per_epoch} (global step {self.global_step}, best dev rsum so far "
            f"{self.best_rsum:.2f})"
        )

    def _wrap_model(self) -> torch.nn.Module:
        config, raw = self.config, self.model
        forward = raw
        if self.world.world_size > 1:
            # Only the online encoders train; momentum copies have requires_grad=False, so DDP
            # leaves them alone. Frozen BERT epochs leave parameters without a gradient, and so
            # do learned prototypes until they are drawn from keys.
            waiting_prototypes = raw.prototypes is not None and raw.prototypes.learned and not raw.prototypes.is_ready
            forward = torch.nn.parallel.DistributedDataParallel(
                raw,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config["freeze_bert_epochs"] > 0
                and config["text_encoder"] == "bert"
                or waiting_prototypes,
                **ddp_buffer_kwargs(),
            )
        if config["compile"]:
            _compile_encoders(raw)
        return forward

    def _log_start(self) -> None:
        config, world = self.config, self.world
        if not world.is_main:
            return
        run_config = json.dumps({**config, "code_version": self.version}, indent=2)
        atomic_write(self.run_dir / "config.json", lambda f: f.write(run_config), mode="w")
        amp = str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off"
        self.log.line(
            f"run {self.run_dir} | code {self.version} | device {self.device} x{world.world_size} | "
            f"batch {config['batch_size']} ({config['batch_size'] // world.world_size} per process) | "
            f"amp {amp} | {len(self.train_set)} training captions, {self.steps_per_epoch} steps/epoch"
        )
        self.log.line("config " + json.dumps(config, sort_keys=True))

    # -- checkpoints and validation ------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        rngs = [rng_state()]
        if self.world.world_size > 1:
            rngs = [None] * self.world.world_size
            dist.all_gather_object(rngs, rng_state())
        config = {**self.config, "run_dir": str(self.run_dir or self.config["run_dir"])}  # where it was written
        return {
            "config": config,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_rsum": self.best_rsum,
            "code_version": self.version,
            "vocab_words": self.data["vocab_words"],
            "concept_graph": concept_graph_state(self.data["graph"]),
            "text_encoder_files": self.data["text_encoder_files"],
            "image_dim": self.data["train"].feature_dim,
            "data_fingerprint": self.data["fingerprint"],
            "val_fingerprint": self.data["val_fingerprint"],
        }

    def save(self, name: str) -> None:
        check_replicas(self.model, self.world, self.log)  # collective under DDP: every process calls save
        state = self.checkpoint_state()
        if self.world.is_main:
            save_checkpoint(self.run_dir / name, state)
            if name == "last.pt":
                self.last_saved = (self.run_dir / name, self.global_step)

    def validate_and_keep_best(self) -> None:
        """Validate on rank 0 (one similarity matrix over the dev images, whatever the dataset),
        share the score with every process, save `best.pt` on improvement."""
        rsum = None
        if self.world.is_main:
            ranks_file = None
            if self.run_dir is not None:
                (self.run_dir / "ranks").mkdir(exist_ok=True)
                ranks_file = self.run_dir / "ranks" / f"step{self.global_step}.npz"
            metrics = validate(
                self.model,
                self.data["val"],
                self.data["tokenizer"],
                self.data["graph"],
                self.config,
                self.device,
                text_states=self.val_text_states,
                ranks_file=ranks_file,
            )
            self.log.scalars({f"val/{k}": v for k, v in metrics.items()}, self.global_step)
            self.log.line(
                f"validation at step {self.global_step}: " + " ".join(f"{k}={v:.2f}" for k, v in metrics.items())
            )
            if metrics.get("collapsed"):
                self.log.line("every validation score is equal (a collapsed model): each ground truth ranks last")
            rsum = metrics["rsum"]
        rsum = self.world.broadcast(rsum)
        if rsum > self.best_rsum:
            self.best_rsum = rsum
            self.save("best.pt")
            self.log.line(f"new best rsum {rsum:.2f}: best.pt saved")

    # -- training ------------------------------------------------------------------------------

    def fit(self) -> None:
        while self.epoch < self.config["epochs"]:
            self.train_epoch()
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self.validate_and_keep_best()
            self.save("last.pt")
            self.log.line(f"epoch {self.epoch} done; checkpoint saved")

    def train_epoch(self) -> None:
        from tqdm import tqdm

        from data import to_device

        config, world = self.config, self.world
        self.sampler.set_epoch(self.epoch, skip_batches=self.step_in_epoch)
        self.model.set_text_backbone_frozen(self.epoch < config["freeze_bert_epochs"])
        self.model.set_epoch(self.epoch)
        self.forward.train()
        bar = tqdm(
            self.loader,
            total=self.steps_per_epoch,
            initial=self.step_in_epoch,
            desc=f"epoch {self.epoch + 1}/{config['epochs']}",
            dynamic_ncols=True,
            disable=not (world.is_main and progress_bars(config["progress"])),
        )
        self.window = (time.perf_counter(), 0)
        for batch in bar:
            inputs_problem = _non_finite_inputs(batch, self.global_step + 1)
            if inputs_problem:  # checked on the host's copy: no wait for the device
                raise CoderError(inputs_problem)
            batch = to_device(batch, self.device)
            self.step(batch, bar)
            if (
                config["val_every_steps"]
                and self.global_step % config["val_every_steps"] == 0
                and self.step_in_epoch < self.steps_per_epoch
            ):
                self.mean_losses()  # never validate or save a diverged model
                self.validate_and_keep_best()
                self.forward.train()
            if (
                config["checkpoint_every_steps"]
                and self.global_step % config["checkpoint_every_steps"] == 0
                and self.step_in_epoch < self.steps_per_epoch
            ):
                self.mean_losses()
                self.save("last.pt")
                self.log.line(
                    f"step checkpoint saved: epoch {self.epoch + 1} step {self.step_in_epoch} "
                    f"(global {self.global_step})"
                )
        bar.close()

    def step(self, batch: dict[str, torch.Tensor], bar: Any) -> None:
        """One optimizer step with its learning rate and, at logging steps (and the last of an
        epoch), the divergence check and the log line: the losses stay on the device between
        them, so that a step does not wait for the device."""
        config = self.config
        factor = lr_factor(self.global_step, self.steps_per_epoch, config)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        diagnose = config["diag_every"] and (self.global_step + 1) % config["diag_every"] == 0
        logging = (self.global_step + 1) % config["log_every"] == 0 or self.step_in_epoch + 1 == self.steps_per_epoch
        # measured on the batch before the step trains on it (diagnostics.py)
        diagnostics = step_diagnostics(self.model, batch, dcl_weights=diagnose) if logging or diagnose else {}
        term_norms = {} if diagnose else None
        losses, grad_norm = training_step(
            self.forward,
            self.model,
            self.optimizer,
            self.scaler,
            batch,
            self.amp_dtype,
            config["grad_clip"],
            clip_scope=config["grad_clip_scope"],
            term_norms=term_norms,
        )
        self.global_step += 1
        self.step_in_epoch += 1
        self.last_losses = {**losses, **{f"diag_{k}": v for k, v in diagnostics.items() if not k.startswith("dcl_")}}
        if term_norms:
            term_norms.update({f"diag/{k}": float(v) for k, v in diagnostics.items() if k.startswith("dcl_")})
            self.log.scalars(term_norms, self.global_step)
            self.log.line(
                f"gradient norms at step {self.global_step} (rank 0's batch): "
                + " ".join(f"{k}={v:.4g}" for k, v in term_norms.items())
            )
        start, items = self.window
        self.window = (start, items + config["batch_size"])
        if self.global_step % config["log_every"] == 0 or self.step_in_epoch == self.steps_per_epoch:
            self._log_step(self.mean_losses(), grad_norm, bar)

    def mean_losses(self) -> dict[str, float]:
        """The last step's losses averaged over the processes (the global-batch loss, the same on
        every process; a collective, called by all at the same steps). A non-finite loss stops
        the run: training diverged at that step or one after the previous check."""
        mean = self.world.mean(self.last_losses)
        if not math.isfinite(mean["loss"]):
            raise CoderError(
                f"training diverged by step {self.global_step} (loss {mean['loss']}); try a lower --lr or --amp off"
            )
        return mean

    def _log_step(self, mean_losses: dict[str, float], grad_norm: torch.Tensor, bar: Any) -> None:
        start, items = self.window
        values = {(f"diag/{k[5:]}" if k.startswith("diag_") else f"loss/{k}"): v for k, v in mean_losses.items()}
        values["speed/captions_per_s"] = items / max(time.perf_counter() - start, 1e-9)
        values["train/grad_norm"] = float(grad_norm)
        values["train/queue_fill"] = self.model.queues.fraction_filled()
        for i, group in enumerate(self.optimizer.param_groups):
            values[f"lr/{group.get('name', i)}"] = group["lr"]
        self.log.scalars(values, self.global_step)
        bar.set_postfix(loss=f"{values['loss/loss']:.4f}", cap_s=f"{values['speed/captions_per_s']:.0f}")
        self.log.line(
            f"epoch {self.epoch + 1} step {self.step_in_epoch}/{self.steps_per_epoch} "
            f"(global {self.global_step}) " + " ".join(f"{k}={v:.5g}" for k, v in values.items())
        )
        self.window = (time.perf_counter(), 0)

    def interrupted_message(self) -> str:
        """What Ctrl-C prints: where the progress is and how to continue."""
        script = f"train_{self.dataset}.py"
        if self.last_saved is None:
            return (
                f"interrupted at epoch {self.epoch + 1}, step {self.step_in_epoch}; no checkpoint was written "
                f"yet in {self.run_dir} (start again to train)"
            )
        path, step = self.last_saved
        return (
            f"interrupted at global step {self.global_step}; {path} holds step {step}: resume with "
            f"python {script} --resume {path}"
        )


def _non_finite_inputs(batch: dict[str, torch.Tensor], step: int) -> str | None:
    """What is wrong with a batch whose cached text states hold NaN or inf (None if nothing is).
    The image features are checked as they are read (data.PrecompSplit)."""
    states = batch.get("text_states")
    if states is None or torch.isfinite(states).all():
        return None
    where = batch["image_ids"][~torch.isfinite(states).flatten(1).all(1)].unique().tolist()
    return (
        f"the text state cache (text_state_cache): non-finite values (NaN or inf) in the states of the "
        f"captions of image(s) {where[:5]} at step {step}; delete the cache file to recompute it"
    )


def device_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, description) of the memory a run on `device` can use: the GPU's, else the RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def _describe_data(fingerprint: dict[str, Any]) -> str:
    return (
        f"{fingerprint['images']} images x {fingerprint['regions']} x {fingerprint['feature_dim']}, "
        f"{fingerprint['captions']} captions, hash {fingerprint['sha256'][:12]}"
    )


def progress_bars(requested: bool) -> bool:
    """Bars only on a terminal: redirected to a file, tqdm's carriage-return updates would fill it."""
    return requested and sys.stderr.isatty()


def _train(config: dict[str, Any], dataset: str, world: Dist) -> dict[str, Any]:
    run = TrainingRun(config, dataset, world)
    try:
        run.fit()
    except KeyboardInterrupt:
        run.log.line("interrupted by the user (Ctrl-C)")
        run.log.close()
        raise Interrupted(run.interrupted_message()) from None
    except BaseException:  # a failed run lets go of its log and TensorBoard files at once
        run.log.close()
        raise
    metrics: dict[str, Any] = {}
    if world.is_main and config["test_split"]:
        metrics = _final_test(run.run_dir, config, run.device, dataset, run.log)
    run.log.close()
    return metrics


class Interrupted(CoderError):
    """Ctrl-C during training: the message says which checkpoint holds the progress (exit 130)."""

    exit_code = 130


def _final_test(
    run_dir: Path, config: dict[str, Any], device: torch.device, dataset: str, log: RunLog
) -> dict[str, Any]:
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
    atomic_write(run_dir / "test_metrics.json", lambda f: f.write(json.dumps(metrics, indent=2)), mode="w")
    log.line(f"test split '{config['test_split']}' with best.pt:\n" + evaluation.format_table(metrics))
    return metrics
