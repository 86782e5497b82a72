"""A small synthetic dataset in the SCAN precomp layout, learnable in minutes on a CPU.

A fixed random "world" gives each object, attribute, action and place a prototype vector, and
each object a usual place, two usual actions and a usual colour (so concepts co-occur and the
concept graph has edges). An image shows a subject (an attributed object doing an action), a
second attributed object and a place: its regions are noisy mixtures of those prototypes plus pure-noise background regions,
in random order. Its five captions name a random subset of the scene through varied templates,
so a model must learn which words go with which region vectors. Everything is a deterministic
function of the seed; a manifest written last marks a complete, reusable dataset.

    python demo_data.py [--root data_cache] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from concepts import build_concepts
from utils import CoderError, atomic_write, cli_entry
from vocab import build_vocab

FORMAT_VERSION = 1
OBJECTS = (
    "dog cat horse bird cow sheep elephant bear zebra giraffe man woman boy girl child player "
    "bicycle car bus truck train boat airplane motorcycle skateboard surfboard kite ball frisbee "
    "umbrella bench chair table couch bed laptop phone clock vase pizza"
).split()
ATTRIBUTES = "red blue green yellow black white brown orange pink purple gray small large old young".split()
ACTIONS = "running sitting standing jumping walking eating sleeping playing swimming flying".split()
PLACES = {
    "grass": "on the grass",
    "street": "in the street",
    "beach": "on the beach",
    "snow": "in the snow",
    "kitchen": "in a kitchen",
    "field": "in a field",
    "water": "near the water",
    "park": "in a park",
}
CAPTIONS_PER_IMAGE = 5

# Region layout of a scene (16 regions): which prototypes each region mixes.
SUBJECT_REGIONS, OBJECT_REGIONS, ACTION_REGIONS, PLACE_REGIONS = 4, 3, 2, 3
ATTRIBUTE_WEIGHT, SUBJECT_IN_ACTION_WEIGHT = 0.7, 0.5
REGION_NOISE, BACKGROUND_NOISE = 1.0, 1.5  # noise norm per region
# How often a scene follows its subject's habits (usual place, one of two actions, colour).
P_USUAL_PLACE, P_USUAL_ACTION, P_USUAL_ATTRIBUTE = 0.6, 0.6, 0.4


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _noun_phrase(rng: np.random.Generator, obj: str, attr: str, p_attr: float) -> str:
    return _a(f"{attr} {obj}" if rng.random() < p_attr else obj)


def _caption(rng: np.random.Generator, scene: tuple[int, int, int, int, int, str]) -> str:
    """One caption naming a random subset of the scene through a random template."""
    subj, subj_attr, obj, obj_attr, action, place = scene
    s = _noun_phrase(rng, OBJECTS[subj], ATTRIBUTES[subj_attr], 0.75)
    o = _noun_phrase(rng, OBJECTS[obj], ATTRIBUTES[obj_attr], 0.5) if rng.random() < 0.6 else ""
    act = ACTIONS[action] if rng.random() < 0.7 else ""
    where = PLACES[place] if rng.random() < 0.5 else ""
    template = int(rng.integers(5))
    if template == 0:
        parts = [s, f"is {act}" if act else "", f"next to {o}" if o else "", where]
    elif template == 1:
        parts = ["there is", s, act, where, f"and {o}" if o else ""]
    elif template == 2:
        parts = ["a photo of", s, f"and {o}" if o else "", where]
    elif template == 3:
        parts = [o, "and" if o else "", s, act, where]
    else:
        parts = [s, act, f"with {o}" if o else "", where]
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:] + (" ." if rng.random() < 0.7 else "")


def _world(seed: int, dim: int) -> dict[str, np.ndarray]:
    """Unit prototype vectors of every object, attribute, action and place, and each object's
    habits (usual place, two usual actions, usual attribute), all fixed by the seed."""
    rng = np.random.default_rng([seed, 1000])

    def unit(n: int) -> np.ndarray:
        v = rng.standard_normal((n, dim))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    n = len(OBJECTS)
    return {
        "objects": unit(n),
        "attributes": unit(len(ATTRIBUTES)),
        "actions": unit(len(ACTIONS)),
        "places": unit(len(PLACES)),
        "usual_place": rng.integers(len(PLACES), size=n),
        "usual_actions": np.stack([rng.choice(len(ACTIONS), 2, replace=False) for _ in range(n)]),
        "usual_attribute": rng.integers(len(ATTRIBUTES), size=n),
    }


def _pick(rng: np.random.Generator, p_usual: float, usual: np.ndarray | int, choices: int) -> int:
    """A usual value with probability p_usual, else any value uniformly."""
    return int(rng.choice(np.atleast_1d(usual)) if rng.random() < p_usual else rng.integers(choices))


def _make_split(
    seed: int, split_no: int, num_images: int, regions: int, dim: int, world: dict[str, np.ndarray]
) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng([seed, split_no])
    places = list(PLACES)
    feats = np.empty((num_images, regions, dim), dtype=np.float32)
    captions: list[str] = []
    noise_std = REGION_NOISE / np.sqrt(dim)
    for i in range(num_images):
        subj, obj = rng.choice(len(OBJECTS), size=2, replace=False)
        subj_attr = _pick(rng, P_USUAL_ATTRIBUTE, world["usual_attribute"][subj], len(ATTRIBUTES))
        obj_attr = _pick(rng, P_USUAL_ATTRIBUTE, world["usual_attribute"][obj], len(ATTRIBUTES))
        action = _pick(rng, P_USUAL_ACTION, world["usual_actions"][subj], len(ACTIONS))
        place = _pick(rng, P_USUAL_PLACE, world["usual_place"][subj], len(places))
        subject = world["objects"][subj] + ATTRIBUTE_WEIGHT * world["attributes"][subj_attr]
        content = (
            [subject] * SUBJECT_REGIONS
            + [world["objects"][obj] + ATTRIBUTE_WEIGHT * world["attributes"][obj_attr]] * OBJECT_REGIONS
            + [world["actions"][action] + SUBJECT_IN_ACTION_WEIGHT * subject] * ACTION_REGIONS
            + [world["places"][place]] * PLACE_REGIONS
        )[:regions]
        rows = np.zeros((regions, dim))
        rows[: len(content)] = content
        rows[: len(content)] += rng.normal(0.0, noise_std, (len(content), dim))
        rows[len(content) :] = rng.normal(0.0, BACKGROUND_NOISE / np.sqrt(dim), (regions - len(content), dim))
        feats[i] = rows[rng.permutation(regions)]
        scene = (int(subj), int(subj_attr), int(obj), int(obj_attr), action, places[place])
        captions.extend(_caption(rng, scene) for _ in range(CAPTIONS_PER_IMAGE))
    return feats, captions


def make_demo_dataset(
    root: str | Path,
    seed: int = 0,
    num_train: int = 2000,
    num_dev: int = 200,
    num_test: int = 200,
    regions: int = 16,
    dim: int = 64,
) -> dict[str, str]:
    """Write (or reuse) the demo dataset under `root` and return its paths.

    Writes `root/demo_precomp/{train,dev,test}_ims.npy|_caps.txt|_ids.txt`,
    `root/demo_precomp/vocab.json` (from the train captions, min count 4), and the concept folder
    `root/demo_concepts/` (objects, places, attributes, actions, word-seeded random 50-d vectors).
    Returns {"data_path", "vocab_path", "concept_dir", "manifest"} as strings.
    """
    root = Path(root)
    data_path, concept_dir, manifest_path = root / "demo_precomp", root / "demo_concepts", root / "demo_manifest.json"
    paths = {
        "data_path": str(data_path),
        "vocab_path": str(data_path / "vocab.json"),
        "concept_dir": str(concept_dir),
        "manifest": str(manifest_path),
    }
    params = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_dev": num_dev,
        "num_test": num_test,
        "regions": regions,
        "dim": dim,
    }
    if min(num_train, num_dev, num_test, regions, dim) < 1:
        raise CoderError(f"demo dataset sizes must be positive, got {params}")
    if manifest_path.exists():
        try:
            if json.loads(manifest_path.read_text())["params"] == params:
                return paths
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable manifest: regenerate
        manifest_path.unlink()
    for stale in (data_path, concept_dir):
        shutil.rmtree(stale, ignore_errors=True)

    world = _world(seed, dim)
    sizes = {"train": num_train, "dev": num_dev, "test": num_test}
    for split_no, (split, n) in enumerate(sizes.items()):
        feats, captions = _make_split(seed, split_no, n, regions, dim, world)
        atomic_write(data_path / f"{split}_ims.npy", lambda f, a=feats: np.save(f, a, allow_pickle=False))
        atomic_write(data_path / f"{split}_caps.txt", lambda f, c=captions: f.write("\n".join(c) + "\n"), mode="w")
        ids = "".join(f"demo_{split}_{i}\n" for i in range(n))
        atomic_write(data_path / f"{split}_ids.txt", lambda f, t=ids: f.write(t), mode="w")
    train_caps = data_path / "train_caps.txt"
    build_vocab([train_caps]).save(data_path / "vocab.json")
    build_concepts([train_caps], concept_dir, concept_words=OBJECTS + list(PLACES) + ATTRIBUTES + ACTIONS)
    manifest = {"params": params, "splits": sizes, "captions_per_image": CAPTIONS_PER_IMAGE, **paths}
    atomic_write(manifest_path, lambda f: json.dump(manifest, f, indent=1), mode="w")
    return paths


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    from options import ArgumentParser, check_writable_dir, int_range

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--root", default="data_cache", help="output folder (default data_cache)")
    parser.add_argument("--seed", type=int_range(0, 2**32 - 1), default=0)
    parser.add_argument(
        "--train",
        type=int_range(1, 100_000),
        default=2000,
        help="training images (5 captions each; at most 100,000, 0.8 GB of features)",
    )
    args = parser.parse_args(argv)
    check_writable_dir(args.root, "--root")
    print(json.dumps(make_demo_dataset(args.root, seed=args.seed, num_train=args.train)))


if __name__ == "__main__":
    main(sys.argv[1:])
