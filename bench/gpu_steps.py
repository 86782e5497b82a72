"""GPU readiness: what a CUDA training run does, each checked in seconds on one GPU.

1. `train_f30k.py` on a small synthetic dataset, one epoch with a checkpoint every 2 steps, then
   `--resume` from its last.pt for a second epoch: with --amp bf16 and the BERT text encoder (a
   small random BERT saved to a folder that is renamed before the resume: the checkpoint
   carries its text encoder), and with --amp fp16, whose GradScaler's scale the checkpoint
   holds and the resumed run continues from.
2. One training step (`trainer.training_step`: forward, backward, clipping, AdamW, the momentum
   and queue updates) of the full model, Bi-GRU and BERT text encoders, bf16 autocast, under
   `torch.cuda.set_sync_debug_mode("error")` after warm-up steps: any wait of the host for the
   device raises. The batch goes to the device inside the checked region, from pinned memory,
   as the trainer's loader hands it over. (An fp16 step waits once by design: the GradScaler
   reads whether the gradients overflowed before it lets the optimizer step.)

One JSON line per check; exit status 1 when one failed, 2 when --device cuda has no CUDA.

    python bench/gpu_steps.py [--device cuda] [--out DIR]

`--device cpu` runs the same checks on a CPU, without fp16 and the sync check (both need
CUDA), and the steps of part 2 in fp32: the smoke run of the tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
TINY_BERT = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=64,
)
MODEL_ARGS = (
    "--embed_dim 64 --word_dim 32 --gcn_hidden 32 --queue_size 64 --num_prototypes 16 --batch_size 16 "
    "--lr 1e-3 --warmup_epochs 0 --workers 0 --progress false --val_max_images 0 --log_every 1"
).split()


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def write_tiny_bert(folder: Path, known: list[str]) -> Path:
    """A small BERT with random weights and a word-piece vocabulary holding the `known` words
    (the captions' own, as training requires), saved as a BERT folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *known[: TINY_BERT["vocab_size"] - 5]]
    words += [f"w{i}" for i in range(TINY_BERT["vocab_size"] - len(words))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY_BERT), add_pooling_layer=False).save_pretrained(str(folder))
    return folder


def train(args: list[str], timeout: int = 600) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_f30k.py"), *args], capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stderr.strip()[-1500:]


def train_and_resume(tmp: Path, device: str, amp: str, text_encoder: str) -> dict[str, Any]:
    """One epoch (a checkpoint every 2 steps), then --resume to a second; what they logged."""
    from checkpoint import load_checkpoint
    from demo_data import make_demo_dataset

    started = time.perf_counter()
    name = f"train_resume_{amp}_{text_encoder}"
    paths = make_demo_dataset(tmp / name / "demo", seed=1, num_train=32, num_dev=16, num_test=16, regions=6, dim=64)
    data_args = [
        "--data_path",
        paths["data_path"],
        "--vocab_path",
        paths["vocab_path"],
        "--concept_path",
        paths["concept_dir"],
    ]
    run_dir = tmp / name / "run"
    text_args = ["--text_encoder", text_encoder]
    if text_encoder == "bert":
        from vocab import Vocabulary

        known = Vocabulary.load(paths["vocab_path"]).idx2word[4:]  # past the four special tokens
        text_args += ["--bert_path", str(write_tiny_bert(tmp / name / "bert", known))]
    code, err = train(
        [
            *data_args,
            *MODEL_ARGS,
            *text_args,
            "--device",
            device,
            "--amp",
            amp,
            "--epochs",
            "1",
            "--checkpoint_every_steps",
            "2",
            "--test_split",
            "",
            "--run_dir",
            str(run_dir),
        ]
    )
    result: dict[str, Any] = {"check": name, "device": device, "first_run_exit": code}
    if code == 0 and text_encoder == "bert":
        (tmp / name / "bert").rename(tmp / name / "bert_moved")  # the resume must not need the folder
    if code == 0:
        saved = load_checkpoint(run_dir / "last.pt")
        result["saved_scale"] = saved["scaler"].get("scale") if saved["scaler"] else None
        code, err = train(["--resume", str(run_dir / "last.pt"), "--epochs", "2"])
        result["resume_exit"] = code
    log = (run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else ""
    steps = [line for line in log.splitlines() if "loss/loss=" in line]
    result.update(
        ok=code == 0
        and "resumed from" in log
        and bool(steps)
        and (amp != "fp16") == (result.get("saved_scale") is None),
        logged_steps=len(steps),
        seconds=round(time.perf_counter() - started, 1),
        amp_logged=next(
            (
                part
                for line in log.splitlines()
                if " | amp " in line
                for part in line.split(" | ")
                if part.startswith("amp ")
            ),
            None,
        ),
    )
    if code != 0:
        result["stderr_tail"] = err
    return result


def step_without_waits(tmp: Path, device: str, text_encoder: str, warmup: int = 3) -> dict[str, Any]:
    """A bf16 training step after `warmup` steps, under the sync debug mode "error" on CUDA."""
    import train_f30k
    import trainer
    from bench_throughput import random_graph
    from checkpoint import model_config_from
    from data import to_device
    from model import CODER
    from options import script_config

    started = time.perf_counter()
    result: dict[str, Any] = {"check": f"step_without_waits_{text_encoder}", "device": device}
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bert_path = str(write_tiny_bert(tmp / f"sync_{text_encoder}" / "bert", [])) if text_encoder == "bert" else ""
    vocab = TINY_BERT["vocab_size"]
    cfg = model_config_from(
        script_config(vars(train_f30k)),
        embed_dim=128,
        image_dim=2048,
        text_encoder=text_encoder,
        vocab_size=vocab,
        word_dim=32,
        bert_path=bert_path or "unused",
        gcn_hidden=64,
        queue_size=128,
        num_prototypes=32,
    )
    model = CODER(cfg, *random_graph(gen)).to(device).train()
    defaults = script_config(vars(train_f30k))
    optimizer = torch.optim.AdamW(
        trainer.param_groups(model, defaults["lr"], defaults["weight_decay"], defaults["bert_lr_scale"])
    )
    scaler = torch.amp.GradScaler(device, enabled=False)
    pin = device == "cuda"

    def batch(step: int) -> dict[str, torch.Tensor]:
        """A collated batch on the host, as the loader gives it (pinned on CUDA)."""
        lengths = torch.randint(6, 21, (16,), generator=gen)
        mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long()
        host = {
            "images": torch.randn(16, 36, 2048, generator=gen),
            "tokens": torch.randint(5, vocab, mask.shape, generator=gen) * mask,
            "lengths": lengths,
            "attention_mask": mask,
            "concept_labels": (torch.rand(16, 300, generator=gen) < 0.01).float(),
            "image_ids": torch.arange(16) // 4 + 4 * step,
            "caption_ids": torch.arange(16) + 16 * step,
        }
        return {k: v.pin_memory() if pin and k != "lengths" else v for k, v in host.items()}

    amp = torch.bfloat16 if device == "cuda" else None  # CPU bf16 is emulated on many CPUs: slow

    def step(host: dict[str, torch.Tensor]) -> None:
        trainer.training_step(model, model, optimizer, scaler, to_device(host, device), amp, 2.0, clip_scope="branch")

    try:
        for i in range(warmup):
            step(batch(i))
        checked = batch(warmup)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            step(checked)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
        result["ok"] = True
        result["sync_debug_mode"] = "error" if device == "cuda" else "not checked: needs CUDA"
    except Exception as err:  # noqa: BLE001 (the report names what waited, and where)
        frames = traceback.extract_tb(err.__traceback__)
        result.update(
            ok=False,
            error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            where=[f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-6:]],
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs' folders here (default: a temporary one)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: gpu_steps.py: no CUDA GPU visible to torch (--device cpu runs the CPU part)", file=sys.stderr)
        return 2
    from bench_throughput import quiet_transformers

    quiet_transformers()
    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.out or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        checks = [("bf16", "bert"), ("fp16", "bigru")] if args.device == "cuda" else [("bf16", "bert")]
        for amp, text_encoder in checks:
            result = train_and_resume(tmp, args.device, amp, text_encoder)
            emit(result)
            failed |= not result["ok"]
        for text_encoder in ("bigru", "bert"):
            result = step_without_waits(tmp, args.device, text_encoder)
            emit(result)
            failed |= not result["ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
