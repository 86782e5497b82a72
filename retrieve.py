"""Look at what a trained model retrieves.

    python retrieve.py --checkpoint runs/f8k/best.pt --data_path data/f8k_precomp --split dev \
        --query "a dog runs through the snow" --query "two children on a beach" --k 5
    python retrieve.py --checkpoint ... --data_path ... --image 12      # captions for image 12
    ... --images_dir data/flickr8k/images --grid topk.png  # a PNG of the top-k images

Text queries rank the split's images; an image index ranks its captions. With the image
files at hand (`--images_dir`, names from `{split}_ids.txt`), `--grid` draws one row per
text query: the query, then its top-k images, the correct ones framed in green when the
query is one of the split's own captions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from utils import CoderError, atomic_write, cli_entry, path_problem


def encode_queries(
    model: Any, texts: Sequence[str], tokenizer: Any, graph: Any, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Embed free-text queries the way the caption dataset would (same tokens and labels)."""
    import data
    import vocab

    items = []
    for text in texts:
        item = {"tokens": torch.tensor(tokenizer.encode(text), dtype=torch.long)}
        if graph is not None:
            item["concept_labels"] = torch.from_numpy(graph.multi_hot(vocab.tokenize(text)))
        items.append(item)
    batch = data.to_device(data.collate(items, pad_id=tokenizer.pad_id), device)
    with torch.no_grad():
        return model.encode_captions(batch)


def image_names(split: Any) -> list[str]:
    """One name per image: `{split}_ids.txt` has one line per image or, in some SCAN folders, one
    per caption (then every k-th line is the image's); without the file, "image i"."""
    ids = split.ids
    if not ids:
        return [f"image {i}" for i in range(split.num_images)]
    if len(ids) == split.num_images:
        return list(ids)
    return list(ids[:: split.captions_per_image])


GRID_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def draw_grid(rows: list[tuple[str, list[Path], list[bool]]], out: Path, thumb: int = 160) -> None:
    """One row per query: its text above its top-k thumbnails (green frame: a correct image)."""
    from PIL import Image, ImageDraw

    from backbones import open_photo

    k = max(len(paths) for _, paths, _ in rows)
    text_h, pad = 22, 6
    grid = Image.new("RGB", (k * (thumb + pad) + pad, len(rows) * (thumb + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, (text, paths, correct) in enumerate(rows):
        top = pad + r * (thumb + text_h + pad)
        max_chars = max(10, (grid.width - 2 * pad) // 6)  # PIL's default bitmap font: ~6 px a character
        draw.text((pad, top + 4), text if len(text) <= max_chars else text[: max_chars - 3] + "...", fill="black")
        for c, (path, ok) in enumerate(zip(paths, correct)):
            left = pad + c * (thumb + pad)
            img = open_photo(path, thumb)  # upright by its EXIF orientation, like the features
            img.thumbnail((thumb - 6, thumb - 6))
            cell = Image.new("RGB", (thumb, thumb), "#2e9e44" if ok else "#dddddd")
            cell.paste(img, ((thumb - img.width) // 2, (thumb - img.height) // 2))
            grid.paste(cell, (left, top + text_h))
    image_format = Image.registered_extensions()[out.suffix.lower()]
    atomic_write(out, lambda f: grid.save(f, format=image_format))


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    from options import ArgumentParser, check_output_file, default_device, fraction, positive_int, torch_device

    parser = ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data_path", required=True, help="precomp folder to search")
    parser.add_argument("--split", default="test")
    parser.add_argument("--query", action="append", default=[], help="a text query (repeatable)")
    parser.add_argument("--image", type=int, action="append", default=[], help="an image index (repeatable)")
    parser.add_argument("--k", type=positive_int, default=5)
    parser.add_argument(
        "--mu", type=fraction, default=None, help="concept-branch weight in [0, 1] (default: the run's)"
    )
    parser.add_argument("--images_dir", default="", help="folder with the split's image files, for --grid")
    parser.add_argument("--grid", default="", help="write a PNG grid of each text query's top-k images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    parser.add_argument("--device", type=torch_device, default=default_device())
    parser.add_argument(
        "--bert_path",
        default=None,
        help="a bert checkpoint's BERT folder, if the checkpoint does not hold its config and vocabulary",
    )
    args = parser.parse_args(argv)
    if not args.query and not args.image:
        parser.error("give at least one --query or --image")
    if any(not q.strip() for q in args.query):
        parser.error("--query: an empty query matches nothing; give some words")
    if args.grid and not (args.images_dir and args.query):
        parser.error("--grid needs --images_dir and at least one --query")
    if args.grid:
        check_output_file(args.grid, "--grid", args.overwrite, suffixes=GRID_FORMATS)
        if problem := path_problem(args.images_dir, True, "image folder"):
            raise CoderError(f"--images_dir {args.images_dir}: {problem}")

    import data
    import evaluation
    from checkpoint import load_for_inference

    device = torch.device(args.device)
    model, tokenizer, graph, config = load_for_inference(args.checkpoint, device, args.bert_path)
    mu = config["mu"] if args.mu is None else args.mu
    split = data.load_split(args.data_path, args.split)
    emb = evaluation.encode_split(model, split, tokenizer, graph, device)
    k = min(args.k, split.num_images)
    names = image_names(split)

    grid_rows = []
    if args.query:
        queries = encode_queries(model, args.query, tokenizer, graph, device)
        query_inst, query_con = (None if q is None else q.cpu() for q in queries)
        with torch.no_grad():  # images x queries, transposed to queries x images
            scores = model.similarity(emb.image_instance, emb.image_concept, query_inst, query_con, mu).T
        top = scores.topk(k, dim=1)
        for text, values, indices in zip(args.query, top.values, top.indices):
            own = {i // split.captions_per_image for i, c in enumerate(split.captions) if c.strip() == text.strip()}
            print(f"\nquery: {text}")
            for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist()), 1):
                mark = "  *" if index in own else ""
                print(f"  {rank:2d}. {value:.3f}  [{index}] {names[index]}{mark}")
            if args.grid:
                paths = [Path(args.images_dir) / names[i] for i in indices.tolist()]
                missing = [p for p in paths if not p.is_file()]
                if missing:
                    raise CoderError(f"{missing[0]}: image file not found (check --images_dir)")
                grid_rows.append((text, paths, [i in own for i in indices.tolist()]))
    for index in args.image:
        if not 0 <= index < split.num_images:
            raise CoderError(f"--image {index}: the {args.split} split has images 0..{split.num_images - 1}")
        image_emb = (
            emb.image_instance[index : index + 1],
            None if emb.image_concept is None else emb.image_concept[index : index + 1],
        )
        with torch.no_grad():
            scores = model.similarity(*image_emb, emb.caption_instance, emb.caption_concept, mu)[0]
        top = scores.topk(min(args.k, split.num_captions))
        print(f"\nimage [{index}] {names[index]}")
        for rank, (value, c) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            mark = "  *" if c // split.captions_per_image == index else ""
            print(f"  {rank:2d}. {value:.3f}  {split.captions[c]}{mark}")
    if grid_rows:
        draw_grid(grid_rows, Path(args.grid))
        print(f"\nwrote {args.grid}")
    print("\n(* = a ground-truth match)", file=sys.stderr)


if __name__ == "__main__":
    main()
