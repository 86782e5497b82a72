"""The training loop's pieces: command-line config, LR schedule, resumable sampling, RNG state."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distributed
import options
import trainer
from utils import CoderError

DEFAULTS = {"lr": 2e-4, "epochs": 30, "loss": "dcl", "concept_branch": True, "resume": ""}


def test_overrides_take_the_default_type():
    config, demo, explicit = options.parse_overrides(
        DEFAULTS, ["--lr", "1e-3", "--epochs=3", "--concept-branch", "false", "--loss", "triplet"]
    )
    assert config == {"lr": 1e-3, "epochs": 3, "loss": "triplet", "concept_branch": False, "resume": ""}
    assert not demo and explicit == {"lr", "epochs", "concept_branch", "loss"}
    assert options.parse_overrides(DEFAULTS, ["--demo"])[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--learning_rate", "1"], "unknown option --learning_rate; did you mean --lr?"),
        (["--epoch", "1"], "unknown option --epoch; did you mean --epochs?"),
        (["--zzz", "1"], "unknown option --zzz; see the variables at the top of the script"),
        (["--epochs", "three"], "--epochs: cannot read 'three' as int"),
        (["--concept_branch", "maybe"], "cannot read 'maybe' as bool"),
        (["--lr"], "--lr needs a value"),
        (["lr=3"], "unexpected argument 'lr=3'"),
    ],
)
def test_bad_overrides_are_clear_errors(argv, message):
    with pytest.raises(CoderError, match=message.replace("-", r"\-").replace("(", r"\(")):
        options.parse_overrides(DEFAULTS, argv)


@pytest.mark.parametrize("script", ["train_f30k.py", "train_coco.py"])
def test_help_lists_every_option_with_its_default_and_trains_nothing(script, tmp_path):
    import ast
    import subprocess

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, str(root / script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    defaults = options.script_config(vars(__import__(script[:-3])))
    listed = {}  # name: the value its line gives
    for line in proc.stdout.splitlines():
        if line.startswith("  ") and " = " in line:
            assignment = ast.parse(line.strip()).body[0]
            listed[assignment.targets[0].id] = ast.literal_eval(assignment.value)
    assert listed == defaults and "--preset NAME" in proc.stdout
    assert not any(tmp_path.iterdir())  # no run folder, no demo data


def test_demo_keeps_explicit_overrides():
    defaults = {"epochs": 30, "lr": 2e-4, "data_path": "x"}
    config, demo, _ = options.parse_overrides(defaults, ["--demo", "--epochs", "2"])
    assert demo and config["epochs"] == 2 and config["lr"] == options.DEMO_OVERRIDES["lr"]
    assert config["data_path"] == options.DEMO_OVERRIDES["data_path"]


def test_lr_schedule_warmup_then_step_decay():
    config = {"warmup_epochs": 1, "lr_decay_epoch": 3, "lr_decay_factor": 0.1}
    factors = [trainer.lr_factor(step, 4, config) for step in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4:12] == [1.0] * 8
    assert factors[12:] == [pytest.approx(0.1)] * 4


def test_resumable_sampler_continues_the_same_order():
    full = distributed.ResumableSampler(103, world_size=1, rank=0, seed=5, batch_size=10)
    full.set_epoch(2)
    order = list(full)
    resumed = distributed.ResumableSampler(103, world_size=1, rank=0, seed=5, batch_size=10)
    resumed.set_epoch(2, skip_batches=4)
    assert list(resumed) == order[40:] and len(resumed) == len(order) - 40
    full.set_epoch(3)
    assert list(full) != order  # reshuffled every epoch


def test_sampler_shards_are_disjoint_and_cover_the_same_set_as_one_process():
    shards = []
    for rank in range(2):
        sampler = distributed.ResumableSampler(100, world_size=2, rank=rank, seed=0, batch_size=5)
        sampler.set_epoch(0)
        shards.append(list(sampler))
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == len(shards[1]) == 50


def test_rng_state_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import checkpoint

    trainer.seed_everything(3)
    path = tmp_path / "rng.pt"
    checkpoint.save_checkpoint(path, {"rng": trainer.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    trainer.seed_everything(99)
    trainer.set_rng_state(checkpoint.load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_starting_an_epoch_leaves_the_global_rng_alone():
    """A mid-epoch checkpoint saved the global RNG; creating the next epoch's iterator must not
    draw from it, or a resumed run's dropout masks would be shifted by one draw."""

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return {"tokens": torch.tensor([1, i + 4, 2]), "image_id": i, "caption_id": i}

    sampler = distributed.ResumableSampler(12, world_size=1, rank=0, seed=0, batch_size=4)
    loader = trainer.make_train_loader(Items(), sampler, {"workers": 0, "seed": 0}, pad_id=0)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    batches = list(loader)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(batches) == 3 and batches[0]["tokens"].shape == (4, 3)


READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
PROJECT = str(Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"prototype_init": "keys", "num_prototypes": 12},
        {"prototype_update": "learned"},
        {"loss": "triplet"},
        {
            "image_pooling": "gpo",
            "text_pooling": "gpo",
            "loss": "triplet",
            "triplet_all_negatives_epochs": 1,
            "region_drop": 0.2,
            "queue_size": 0,
            "concept_branch": False,
        },
    ],
)
def test_a_training_step_reads_nothing_back_from_the_model(monkeypatch, overrides):
    """After warm-up (queues filling, prototypes drawn from keys), trainer.training_step's
    project code makes no .item()/.tolist()/.cpu()/.numpy()/bool()/int()/float()/index read of
    a tensor, nor a torch.unique (whose size only the device knows): it branches on host-side
    counters. The last case is the VSE∞ row (GPO pooling, region dropping, the warm-up). (Reads inside torch, of tensors torch keeps on the host,
    such as a packed sequence's batch sizes or AdamW's step counts, are torch's own.)"""
    from test_model import build, make_batch, small_config

    model = build(small_config(**overrides)).train()
    optimizer = torch.optim.AdamW(trainer.param_groups(model, 1e-3, 1e-4, 0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [make_batch(seed=seed, first_image=4 * seed) for seed in range(4)]

    def step(seed):
        return trainer.training_step(model, model, optimizer, scaler, batches[seed], None, 2.0, clip_scope="branch")

    for seed in range(3):
        step(seed)
    assert model.prototypes is None or model.prototypes.is_ready
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, _name=name, _original=original):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT):
                reads.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _original(tensor, *args)

        monkeypatch.setattr(torch.Tensor, name, counting)
    unique = torch.unique

    def counted_unique(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if caller.startswith(PROJECT):
            reads.append(f"torch.unique in {caller}:{sys._getframe(1).f_lineno}")
        return unique(*args, **kwargs)

    monkeypatch.setattr(torch, "unique", counted_unique)
    assert int(torch.tensor(3)) == 3 and len(reads) == 1  # the counting works
    reads.clear()
    losses, grad_norm = step(3)
    assert reads == []
    monkeypatch.undo()
    assert torch.isfinite(losses["loss"]) and float(grad_norm) > 0


def test_the_loop_reads_the_losses_only_at_logging_steps(tmp_path, monkeypatch):
    """The per-step losses stay on the device except at logging steps (every log_every steps and
    the last of each epoch), where the divergence check reads them too."""
    import train_f30k
    from conftest import TINY_TRAIN_ARGS, tiny_demo_args

    argv = [
        *tiny_demo_args(tmp_path / "data", seed=1, num_train=24, num_eval=10),
        *TINY_TRAIN_ARGS,
        "--queue_size",
        "40",
        "--batch_size",
        "16",
        "--epochs",
        "2",
        "--log_every",
        "3",
        "--test_split",
        "",
        "--checkpoint_every_steps",
        "0",
        "--diag_every",
        "0",
        "--run_dir",
        str(tmp_path / "run"),
    ]
    config, _, _ = options.parse_overrides(options.script_config(vars(train_f30k)), argv)
    read_at = []
    mean = distributed.Dist.mean

    def recording(world, values):
        read_at.append(run_state["run"].global_step)
        return mean(world, values)

    run_state = {}
    original_init = trainer.TrainingRun.__init__

    def remember(self, *args):
        run_state["run"] = self
        original_init(self, *args)

    monkeypatch.setattr(distributed.Dist, "mean", recording)
    monkeypatch.setattr(trainer.TrainingRun, "__init__", remember)
    trainer.train(config, "f30k")
    assert read_at == [3, 6, 7, 9, 12, 14]  # 7 steps per epoch
    log = (tmp_path / "run" / "train.log").read_text()
    assert "(global 3)" in log and "(global 4)" not in log and "(global 14)" in log


@pytest.mark.parametrize("collapsed", [True, False])
def test_validation_flags_a_collapsed_model_and_saves_its_ranks(tmp_path, monkeypatch, collapsed):
    """Equal embeddings for every item score rsum 0 (ties count against the model) and are named
    as collapsed; the ranks file holds the same ranks as evaluation.retrieval_ranks."""
    import evaluation

    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1)
    captions = images.repeat_interleave(5, 0) + 0.3 * torch.randn(150, 8, generator=gen)
    if collapsed:
        images, captions = torch.ones(30, 8) / 8**0.5, torch.ones(150, 8) / 8**0.5
    captions = torch.nn.functional.normalize(captions, dim=1)
    found = evaluation.Embeddings(images, None, captions, None, "concat")
    monkeypatch.setattr(evaluation, "encode_split", lambda *args, **kwargs: found)
    config = {"eval_batch_size": 8, "workers": 0, "mu": 0.15}
    metrics = trainer.validate(None, None, None, None, config, torch.device("cpu"), ranks_file=tmp_path / "r.npz")
    assert ("collapsed" in metrics) == collapsed
    assert (metrics["rsum"] == 0.0) == collapsed
    want = evaluation.retrieval_ranks(images @ captions.t(), 5)
    saved = np.load(tmp_path / "r.npz")
    assert saved["image_ranks"].tolist() == want[0].tolist() and saved["caption_ranks"].tolist() == want[1].tolist()
