"""The options for CODER's reconstructed parts and the training diagnostics, each against a
direct computation on tiny data."""

import math

import pytest
import torch
import torch.nn.functional as F

import model as M
import trainer
from diagnostics import step_diagnostics, term_gradient_norms
from test_model import build, make_batch, small_config


def _step(model, batch):
    out = model(batch)
    out["loss"].backward()
    return out


def weighted_terms(model, out):
    """Each term of the loss times its weight λ, with its graph: the reference's terms."""
    weights = model.cfg.loss_weights()
    return {name: weights[name] * term for name, term in out.items() if name != "loss"}


def test_detached_concept_query_keeps_the_concept_losses_out_of_the_encoders():
    """'detach': the concept-DCL and pseudo-label terms give the instance encoders no gradient;
    'bn' (`--preset spec`) does, and 'no_bn' drops only the BatchNorm of the instance path."""
    norms = {}
    for mode in ("bn", "detach", "no_bn"):
        model = build(small_config(concept_query_input=mode))
        norms[mode] = term_gradient_norms(model, model(make_batch()))
    for module in ("image_encoder", "text_encoder"):
        assert norms["detach"][f"grad/{module}/dcl_concept"] == 0.0
        assert norms["detach"][f"grad/{module}/pseudo"] == 0.0
        assert norms["bn"][f"grad/{module}/dcl_concept"] > 0.0
        assert norms["no_bn"][f"grad/{module}/dcl_concept"] > 0.0
        assert norms["detach"][f"grad/{module}/dcl_instance"] == pytest.approx(
            norms["bn"][f"grad/{module}/dcl_instance"]
        )
    no_bn = build(small_config(concept_query_input="no_bn"))
    assert isinstance(no_bn.image_query.instance_bn, torch.nn.Identity)
    assert isinstance(no_bn.image_query.concept_bn, torch.nn.BatchNorm1d)


def test_term_gradient_norms_match_separate_backward_passes():
    model = build(small_config(lambda_concept=0.5, lambda_pseudo=0.25, concept_query_input="bn"))  # every term reaches
    losses = model(make_batch())
    norms = term_gradient_norms(model, losses)
    terms = weighted_terms(model, losses)
    for key in terms:
        model.zero_grad(set_to_none=True)
        terms[key].backward(retain_graph=True)
        grads = [p.grad for p in model.image_encoder.parameters() if p.grad is not None]
        want = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        assert norms[f"grad/image_encoder/{key}"] == pytest.approx(want, rel=1e-5)
    weighted = build(small_config(lambda_concept=0.2))
    terms = weighted_terms(weighted, weighted(make_batch()))
    unweighted = build(small_config(lambda_concept=1.0))
    plain = weighted_terms(unweighted, unweighted(make_batch()))
    assert torch.allclose(terms["dcl_concept"], 0.2 * plain["dcl_concept"])


def test_l2norm_before_pooling_normalises_each_region():
    model = build(small_config(l2norm_before_pooling=True, image_pooling="mean"))
    images = make_batch()["images"]
    regions = F.normalize(model.image_encoder.fc(images), dim=-1)
    assert torch.allclose(model.image_encoder(images), F.normalize(regions.mean(1), dim=-1), atol=1e-6)
    plain = build(small_config(image_pooling="mean"))
    assert not torch.allclose(plain.image_encoder(images), model.image_encoder(images), atol=1e-3)


def test_fused_term_is_infonce_on_the_inference_similarity():
    """lambda_fused: DCL on S = (1-mu) s(v,t) + mu s(v_c,t_c), checked with beta 0 against
    an InfoNCE written out on explicit similarity matrices (keys and two queue entries)."""
    mu, tau = 0.3, 0.05
    model = build(
        small_config(
            lambda_fused=3.0,
            lambda_concept=1.0,
            lambda_pseudo=1.0,
            mu=mu,
            fusion="concat",
            beta=0.0,
            tau=tau,
            false_negative_threshold=0.0,
            loss="dcl",
        )
    )
    gen = torch.Generator().manual_seed(1)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen), dim=-1)

    b, d = 4, 32
    img, img_c, cap, cap_c = unit(b, d), unit(b, d), unit(b, d), unit(b, d)
    keys = {
        "image": unit(b, d),
        "image_concept": unit(b, d),
        "text": unit(b, d),
        "text_concept": unit(b, d),
        "ids": torch.arange(b),
    }
    queues = {name: unit(2, d) for name in ("image", "image_concept", "text", "text_concept")}
    queue_ids = torch.tensor([0, 7])  # the first entry shares image 0: never its negative
    queries = {"image": img, "image_concept": img_c, "text": cap, "text_concept": cap_c, "ids": torch.arange(b)}
    got = model.contrast(model.fuse, M.StepEmbeddings(queries, keys, {**queues, "ids": queue_ids}))

    def fused(q, q_c, k, k_c):
        return (1 - mu) * q @ k.t() + mu * q_c @ k_c.t()

    def direction(q, q_c, key, key_c):
        in_batch = fused(q, q_c, keys[key], keys[key_c])
        queue = fused(q, q_c, queues[key], queues[key_c])
        losses = []
        for i in range(b):
            negatives = [in_batch[i, j] for j in range(b) if j != i] + [
                queue[i, j] for j in range(2) if int(queue_ids[j]) != i
            ]
            logits = torch.stack([in_batch[i, i], *negatives]) / tau
            losses.append(-torch.log_softmax(logits, 0)[0])
        return torch.stack(losses).mean()

    want = (direction(img, img_c, "text", "text_concept") + direction(cap, cap_c, "image", "image_concept")) / 2
    assert torch.allclose(got, want, atol=1e-5)
    out = model(make_batch())
    assert "dcl_fused" in out
    assert torch.allclose(
        out["loss"], out["dcl_instance"] + out["dcl_concept"] + out["pseudo"] + 3.0 * out["dcl_fused"], atol=1e-5
    )


def test_prototypes_from_keys_wait_for_enough_keys_then_copy_them():
    """prototype_init 'keys': no pseudo-label loss until batch + queues hold K_p keys; then the
    prototypes are K_p of those keys."""
    model = build(small_config(prototype_init="keys", num_prototypes=24, queue_size=32)).train()
    first = _step(model, make_batch(seed=0))  # 16 keys < 24 prototypes
    assert "pseudo" not in first and not model.prototypes.is_ready and not bool(model.prototypes.ready)
    batch = make_batch(seed=1, first_image=4)
    with torch.no_grad():
        pool = torch.cat(
            [model.momentum_keys(batch, model.concepts())[n] for n in ("image", "text")]
            + [model.queues.entries("image"), model.queues.entries("text")]
        )
    second = _step(model, batch)
    assert "pseudo" not in second and model.prototypes.is_ready and bool(model.prototypes.ready)
    cosines = model.prototypes.weight @ F.normalize(pool, dim=-1).t()
    assert cosines.max(1).values.min() > 1 - 1e-6  # every prototype is one of the keys
    assert len(set(cosines.argmax(1).tolist())) == 24  # distinct keys
    assert "pseudo" in _step(model, make_batch(seed=2, first_image=8))


def test_learned_prototypes_train_and_stay_unit_norm():
    model = build(small_config(prototype_update="learned")).train()
    assert isinstance(model.prototypes.weight, torch.nn.Parameter)
    optimizer = torch.optim.SGD(trainer.param_groups(model, 0.5, 0.0, 0.1), lr=0.5)
    before = model.prototypes.weight.detach().clone()
    for seed in range(3):
        out = model(make_batch(seed=seed, first_image=4 * seed))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert model.prototypes.weight.grad is not None and model.prototypes.weight.grad.abs().sum() > 0
        optimizer.step()
    assert not torch.allclose(before, model.prototypes.weight)
    model(make_batch(seed=3, first_image=12))  # a training forward first puts them back on the sphere
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(16), atol=1e-5)


def test_diagnostics_match_direct_computations():
    """step_diagnostics: the statistics of the evaluation-mode model on the batch, computed
    without writing anything (the training model keeps its state and mode)."""
    model = build(small_config(beta=0.0, region_drop=0.2)).train()
    batch = make_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    random_state = torch.get_rng_state()
    diag = step_diagnostics(model, batch, dcl_weights=True)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), random_state)  # the training run's random stream is untouched
    model.eval()
    with torch.no_grad():
        _, img_c = model.encode_images(batch["images"])
        targets, codes = model.pseudo_labels(model.momentum_keys(batch, model.concepts()), 8)
        out = model(batch)
    n = img_c.shape[0]
    cos = img_c @ img_c.t()
    assert diag["concept_cos_image"] == pytest.approx(
        float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))), abs=1e-5
    )
    entropy = float(-(targets * targets.log()).sum(1).mean())
    assert diag["target_entropy"] == pytest.approx(entropy, rel=1e-4)
    assert diag["pseudo_excess"] == pytest.approx(float(out["pseudo"]) - entropy, rel=1e-4, abs=1e-5)
    assert diag["prototypes_used"] == pytest.approx(len(set(codes.argmax(1).tolist())) / 16)
    assert 0 < float(diag["prototypes_used"]) <= 1
    assert diag["dcl_beta"] == 0.0 and diag["dcl_weight_entropy"] == pytest.approx(1.0, abs=1e-5)  # uniform
    assert "dcl_beta" not in step_diagnostics(model, batch, dcl_weights=False)


def test_option_values_are_checked():
    for bad in (
        {"concept_query_input": "stop"},
        {"prototype_init": "kmeans"},
        {"prototype_update": "sgd"},
        {"lambda_fused": -1.0},
        {"bert_frozen_layers": -1},
    ):
        with pytest.raises(M.CoderError):
            small_config(**bad)


def test_branch_clipping_keeps_the_concept_branch_from_throttling_the_encoders():
    """grad_clip_scope 'branch': each branch is clipped on its own, so large concept-branch
    gradients leave the encoders' gradients untouched; 'global' scales every gradient alike."""
    from trainer import clip_gradients

    def gradients(scope):
        model = build(small_config(concept_query_input="detach"))
        model(make_batch())["loss"].backward()
        for p in trainer.parameter_branches(model)["concept"]:
            p.grad.mul_(1000.0)  # a concept branch whose gradients dwarf the encoders'
        before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in before.values()))
        returned = clip_gradients(model, 2.0, scope)
        assert float(returned) == pytest.approx(total, rel=1e-5)  # the norm before clipping
        return model, before

    model, before = gradients("branch")
    branches = trainer.parameter_branches(model)
    assert set(branches) == {"instance", "concept"}
    instance_norm = math.sqrt(
        sum(
            float(before[n].pow(2).sum())
            for n, _ in model.named_parameters()
            if n.startswith(("image_encoder.", "text_encoder.")) and n in before
        )
    )
    for name, p in model.named_parameters():
        if name.startswith(("image_encoder.", "text_encoder.")) and p.grad is not None:
            scale = min(1.0, 2.0 / (instance_norm + 1e-6))
            assert torch.allclose(p.grad, before[name] * scale, rtol=1e-5)
    concept_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in branches["concept"]))
    assert concept_norm == pytest.approx(2.0, rel=1e-4)

    model, before = gradients("global")
    name = "image_encoder.fc.weight"
    assert float(model.get_parameter(name).grad.norm()) < 0.01 * float(before[name].norm())


def test_branch_clipping_is_global_clipping_without_a_concept_branch():
    from trainer import clip_gradients

    grads = []
    for scope in ("global", "branch"):
        model = build(small_config(concept_branch=False))
        model(make_batch())["loss"].backward()
        clip_gradients(model, 0.01, scope)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.allclose(a, b) for a, b in zip(*grads))


def test_a_checkpoint_older_than_an_option_resumes_with_its_old_behaviour(tmp_path):
    """Options whose default changed after a checkpoint was written: resuming keeps what the run
    did (per-branch clipping and the detached query did not exist: global clip, BN query)."""
    import train_f30k
    from checkpoint import resumed_config, save_checkpoint
    from options import script_config

    defaults = script_config(vars(train_f30k))
    old = {k: v for k, v in defaults.items() if k not in ("grad_clip_scope", "concept_query_input")}
    save_checkpoint(tmp_path / "old.pt", {"config": old})
    save_checkpoint(tmp_path / "new.pt", {"config": defaults})
    resumed = resumed_config({**defaults, "resume": str(tmp_path / "old.pt")}, {"resume"})
    assert resumed["grad_clip_scope"] == "global" and resumed["concept_query_input"] == "bn"
    resumed = resumed_config({**defaults, "resume": str(tmp_path / "new.pt")}, {"resume"})
    assert resumed["grad_clip_scope"] == defaults["grad_clip_scope"]
    assert resumed["concept_query_input"] == defaults["concept_query_input"]


def test_spec_preset_comes_before_the_other_options():
    import train_f30k
    from options import PRESETS, parse_overrides, script_config

    defaults = script_config(vars(train_f30k))
    config, _, explicit = parse_overrides(defaults, ["--preset", "spec"])
    assert (config["beta"], config["concept_query_input"], config["grad_clip_scope"]) == (10.0, "bn", "global")
    assert explicit == set(PRESETS["spec"])
    config, _, explicit = parse_overrides(defaults, ["--beta", "5", "--preset=spec"])
    assert config["beta"] == 5.0 and config["concept_query_input"] == "bn"
    with pytest.raises(M.CoderError, match="--preset paper: unknown preset; choose one of spec, infonce_reranker"):
        parse_overrides(defaults, ["--preset", "paper"])
    with pytest.raises(M.CoderError, match="option --preset needs a value"):
        parse_overrides(defaults, ["--preset"])
