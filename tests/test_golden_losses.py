"""The training losses of fixed small models on fixed batches, against numbers recorded once.

Each configuration builds a tiny CODER from a fixed seed, trains it a few SGD steps (so that
the queues fill partly and the prototypes and momentum encoders move) and records every loss
term of every step and a checksum of the queues and prototypes. GOLDEN holds the numbers the
code computed before model.py was restructured (forward written as the loss equation, the
updates inside the forward); a change of behaviour changes them.
"""
import pytest
import torch

import model as M
import trainer

N_CONCEPTS, CONCEPT_DIM, IMAGE_DIM, VOCAB, BATCH = 10, 12, 24, 40, 8

# Every model value, spelled out, so that no default of the train scripts changes the numbers.
BASE = dict(
    embed_dim=32, image_dim=IMAGE_DIM, image_pooling="attn", text_pooling="attn", text_encoder="bigru",
    vocab_size=VOCAB, word_dim=16, word_vectors="", bert_path="", bert_length_groups=1, bert_frozen_layers=0,
    l2norm_before_pooling=False, concept_branch=True, gcn_hidden=24, concept_score_scale=10.0,
    concept_query_input="detach", label_mix_ratio=0.35, momentum_gcn=True, batch_norm=True, momentum=0.9,
    queue_size=40, num_prototypes=16, sinkhorn_epsilon=0.05, sinkhorn_iterations=3, sinkhorn_with_queue=True,
    prototype_momentum=0.9, prototype_init="random", prototype_update="ema", loss="dcl", tau=0.05, beta=0.0,
    beta_warmup_epochs=0, beta_adaptive=False, dcl_weight_groups="joint", false_negative_threshold=0.0,
    margin=0.2, triplet_all_negatives_epochs=0, region_drop=0.0, lambda_concept=1.0, lambda_pseudo=1.0,
    lambda_fused=0.0, lambda_kl=0.0, pseudo_label_loss=True, tau_pseudo=0.1, mu=0.15, fusion="concat",
)

CONFIGS = {
    "infonce": {},
    "no_concept": dict(concept_branch=False),
    "beta5": dict(beta=5.0),
    "beta5_warmup": dict(beta=5.0, beta_warmup_epochs=2),
    "beta5_adaptive": dict(beta=5.0, beta_adaptive=True),
    "beta5_separate": dict(beta=5.0, dcl_weight_groups="separate"),
    "beta5_false_negatives": dict(beta=5.0, false_negative_threshold=0.6),
    "no_queue": dict(queue_size=0, beta=5.0),
    "sinkhorn_batch_only": dict(sinkhorn_with_queue=False),
    "keys_init": dict(prototype_init="keys", num_prototypes=12),
    "learned": dict(prototype_update="learned", region_drop=0.2),
    "triplet": dict(loss="triplet", triplet_all_negatives_epochs=1),
    "cvse": dict(loss="triplet", queue_size=0, pseudo_label_loss=False, concept_query_input="bn",
                 fusion="weighted_sum", lambda_fused=0.6, lambda_concept=0.2, lambda_kl=0.4),
    "dcl_fused_kl": dict(beta=5.0, lambda_fused=3.0, lambda_kl=1.0, gcn_hidden=24, momentum_gcn=False),
    "gpo_no_bn": dict(image_pooling="gpo", text_pooling="gpo", batch_norm=False, concept_query_input="no_bn"),
}


def concept_graph() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(N_CONCEPTS, N_CONCEPTS, generator=gen) < 0.3).float()
    a = ((a + a.t()) > 0).float() * 0.25 + torch.eye(N_CONCEPTS)
    scale = a.sum(1).rsqrt()
    return scale[:, None] * a * scale[None, :], torch.randn(N_CONCEPTS, CONCEPT_DIM, generator=gen)


def batch_of(step: int) -> dict[str, torch.Tensor]:
    """Step `step`'s batch: 4 new images, two captions each."""
    gen = torch.Generator().manual_seed(step)
    lengths = torch.randint(3, 8, (BATCH,), generator=gen)
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return {
        "images": torch.randn(BATCH, 5, IMAGE_DIM, generator=gen),
        "tokens": torch.randint(4, VOCAB, mask.shape, generator=gen) * mask,
        "lengths": lengths,
        "attention_mask": mask.long(),
        "concept_labels": (torch.rand(BATCH, N_CONCEPTS, generator=gen) < 0.3).float(),
        "image_ids": 4 * step + torch.arange(BATCH) // 2,
        "caption_ids": torch.arange(BATCH),
    }


def train_and_record(overrides: dict, steps: int = 4) -> dict[str, float]:
    """Each step's losses (f"{step}/{name}") and the queue and prototype sums after the steps."""
    torch.manual_seed(0)
    cfg = M.ModelConfig(**{**BASE, **overrides})
    model = M.CODER(cfg, *concept_graph()) if cfg.concept_branch else M.CODER(cfg)
    optimizer = torch.optim.SGD(M.param_groups(model, 0.5, 0.0), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    record = {}
    for step in range(steps):
        model.set_epoch(step // 2)
        losses, _ = trainer.training_step(model, model, optimizer, scaler, batch_of(step), None, 1.0, None,
                                          clip_scope="branch")
        record.update({f"{step}/{name}": float(value.detach()) for name, value in losses.items()
                       if not name.startswith("diag_")})
    for name in model.queues.names:
        record[f"queue/{name}"] = float(model.queues.entries(name).sum())
    if model.prototypes is not None:
        record["prototypes"] = float(model.prototypes.weight.detach().sum())
    return record


# Recorded from the code before model.py was restructured (git 9a57df5 with the DCL readings).
GOLDEN: dict[str, dict[str, float]] = {
    "beta5": {
        "0/dcl_concept": 4.901589393615723, "0/dcl_instance": 3.990102767944336, "0/loss": 13.454580307006836,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 3.7327966690063477, "1/dcl_instance": 4.711801528930664,
        "1/loss": 12.077180862426758, "1/pseudo": 3.632582187652588, "2/dcl_concept": 3.7651710510253906,
        "2/dcl_instance": 7.227883815765381, "2/loss": 14.296792984008789, "2/pseudo": 3.3037376403808594,
        "3/dcl_concept": 3.5247106552124023, "3/dcl_instance": 5.978886127471924, "3/loss": 12.589041709899902,
        "3/pseudo": 3.085444450378418, "prototypes": 1.9082849025726318, "queue/image": -15.616246223449707,
        "queue/image_concept": 25.770179748535156, "queue/text": 32.73773956298828,
        "queue/text_concept": 26.11655616760254,
    },
    "beta5_adaptive": {
        "0/dcl_concept": 5.45829963684082, "0/dcl_instance": 4.395227909088135, "0/loss": 14.416415214538574,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 4.481561660766602, "1/dcl_instance": 5.3770432472229,
        "1/loss": 13.541987419128418, "1/pseudo": 3.683382987976074, "2/dcl_concept": 4.3344807624816895,
        "2/dcl_instance": 8.596933364868164, "2/loss": 16.32878875732422, "2/pseudo": 3.397374153137207,
        "3/dcl_concept": 4.301353931427002, "3/dcl_instance": 6.529501914978027, "3/loss": 14.118614196777344,
        "3/pseudo": 3.2877578735351562, "prototypes": 1.7087113857269287, "queue/image": -15.637131690979004,
        "queue/image_concept": 25.587642669677734, "queue/text": 31.59958267211914,
        "queue/text_concept": 25.93238639831543,
    },
    "beta5_false_negatives": {
        "0/dcl_concept": 1.5000115633010864, "0/dcl_instance": 2.971106767654419, "0/loss": 9.034006118774414,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 0.6742671132087708, "1/dcl_instance": 3.337839126586914,
        "1/loss": 7.717132568359375, "1/pseudo": 3.705026149749756, "2/dcl_concept": 0.792118489742279,
        "2/dcl_instance": 5.34541130065918, "2/loss": 9.275392532348633, "2/pseudo": 3.1378629207611084,
        "3/dcl_concept": 0.09680229425430298, "3/dcl_instance": 4.267274856567383, "3/loss": 7.370325565338135,
        "3/pseudo": 3.0062484741210938, "prototypes": 1.9206721782684326, "queue/image": -15.511789321899414,
        "queue/image_concept": 25.714542388916016, "queue/text": 32.79899597167969,
        "queue/text_concept": 26.446256637573242,
    },
    "beta5_separate": {
        "0/dcl_concept": 4.901589393615723, "0/dcl_instance": 3.990102767944336, "0/loss": 13.454580307006836,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 3.71828031539917, "1/dcl_instance": 4.64080810546875,
        "1/loss": 11.991670608520508, "1/pseudo": 3.632582187652588, "2/dcl_concept": 3.7515997886657715,
        "2/dcl_instance": 7.1822896003723145, "2/loss": 14.239288330078125, "2/pseudo": 3.305398464202881,
        "3/dcl_concept": 3.447542190551758, "3/dcl_instance": 5.81986665725708, "3/loss": 12.352408409118652,
        "3/pseudo": 3.0849997997283936, "prototypes": 1.9091604948043823, "queue/image": -15.618054389953613,
        "queue/image_concept": 25.775440216064453, "queue/text": 32.75756072998047,
        "queue/text_concept": 26.115238189697266,
    },
    "beta5_warmup": {
        "0/dcl_concept": 4.528564453125, "0/dcl_instance": 3.6327061653137207, "0/loss": 12.72415828704834,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 3.3644466400146484, "1/dcl_instance": 4.301283836364746,
        "1/loss": 11.285534858703613, "1/pseudo": 3.6198043823242188, "2/dcl_concept": 3.633862018585205,
        "2/dcl_instance": 6.608380317687988, "2/loss": 13.51557731628418, "2/pseudo": 3.27333402633667,
        "3/dcl_concept": 3.2950515747070312, "3/dcl_instance": 5.665972709655762, "3/loss": 12.008350372314453,
        "3/pseudo": 3.0473265647888184, "prototypes": 1.9429630041122437, "queue/image": -15.612333297729492,
        "queue/image_concept": 25.80337142944336, "queue/text": 33.432899475097656,
        "queue/text_concept": 26.177043914794922,
    },
    "cvse": {
        "0/concept_kl": 3.4267239570617676, "0/loss": 2.593873977661133, "0/triplet_concept": 0.7750198841094971,
        "0/triplet_fused": 0.6908660531044006, "0/triplet_instance": 0.6536607146263123,
        "1/concept_kl": 2.4351322650909424, "1/loss": 2.1055970191955566, "1/triplet_concept": 0.627322793006897,
        "1/triplet_fused": 0.6356483697891235, "1/triplet_instance": 0.6246904134750366,
        "2/concept_kl": 1.2419369220733643, "2/loss": 1.5880390405654907, "2/triplet_concept": 0.6242645978927612,
        "2/triplet_fused": 0.5894322395324707, "2/triplet_instance": 0.6127519607543945,
        "3/concept_kl": 1.789715051651001, "3/loss": 1.9373865127563477, "3/triplet_concept": 0.65003901720047,
        "3/triplet_fused": 0.6999778151512146, "3/triplet_instance": 0.6715059280395508,
    },
    "dcl_fused_kl": {
        "0/concept_kl": 3.4267239570617676, "0/dcl_concept": 4.901589393615723, "0/dcl_fused": 3.8048839569091797,
        "0/dcl_instance": 3.990102767944336, "0/loss": 28.295955657958984, "0/pseudo": 4.562888145446777,
        "1/concept_kl": 2.950589656829834, "1/dcl_concept": 4.346236228942871, "1/dcl_fused": 4.39245080947876,
        "1/dcl_instance": 4.598897933959961, "1/loss": 29.113994598388672, "1/pseudo": 4.04091739654541,
        "2/concept_kl": 1.9857215881347656, "2/dcl_concept": 4.398443698883057, "2/dcl_fused": 6.467045307159424,
        "2/dcl_instance": 7.136786460876465, "2/loss": 36.66963577270508, "2/pseudo": 3.747544765472412,
        "3/concept_kl": 1.883720874786377, "3/dcl_concept": 3.8070926666259766, "3/dcl_fused": 5.140740394592285,
        "3/dcl_instance": 5.782116889953613, "3/loss": 30.599254608154297, "3/pseudo": 3.7041046619415283,
        "prototypes": 1.6875388622283936, "queue/image": -15.622136116027832,
        "queue/image_concept": 26.910449981689453, "queue/text": 32.79174041748047,
        "queue/text_concept": 25.635334014892578,
    },
    "gpo_no_bn": {
        "0/dcl_concept": 1.9562511444091797, "0/dcl_instance": 2.6173696517944336, "0/loss": 8.788969039916992,
        "0/pseudo": 4.215348720550537, "1/dcl_concept": 2.3512682914733887, "1/dcl_instance": 3.8577780723571777,
        "1/loss": 9.41828441619873, "1/pseudo": 3.209238052368164, "2/dcl_concept": 2.345935344696045,
        "2/dcl_instance": 4.735227108001709, "2/loss": 10.39024543762207, "2/pseudo": 3.309082508087158,
        "3/dcl_concept": 2.290788412094116, "3/dcl_instance": 4.25396203994751, "3/loss": 9.613055229187012,
        "3/pseudo": 3.068305015563965, "prototypes": 6.855034828186035, "queue/image": 115.0066146850586,
        "queue/image_concept": 67.90846252441406, "queue/text": -24.124500274658203,
        "queue/text_concept": 67.70724487304688,
    },
    "infonce": {
        "0/dcl_concept": 4.528564453125, "0/dcl_instance": 3.6327061653137207, "0/loss": 12.72415828704834,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 3.3644466400146484, "1/dcl_instance": 4.301283836364746,
        "1/loss": 11.285534858703613, "1/pseudo": 3.6198043823242188, "2/dcl_concept": 3.4890153408050537,
        "2/dcl_instance": 6.268322944641113, "2/loss": 13.030672073364258, "2/pseudo": 3.27333402633667,
        "3/dcl_concept": 3.138659954071045, "3/dcl_instance": 5.228127479553223, "3/loss": 11.410810470581055,
        "3/pseudo": 3.0440239906311035, "prototypes": 1.7115044593811035, "queue/image": -15.614189147949219,
        "queue/image_concept": 25.80326271057129, "queue/text": 33.44580841064453,
        "queue/text_concept": 26.180910110473633,
    },
    "keys_init": {
        "0/dcl_concept": 4.528564453125, "0/dcl_instance": 3.6327061653137207, "0/loss": 8.161270141601562,
        "1/dcl_concept": 3.3243491649627686, "1/dcl_instance": 4.301283836364746, "1/loss": 10.571678161621094,
        "1/pseudo": 2.946045398712158, "2/dcl_concept": 3.581974983215332, "2/dcl_instance": 6.268322944641113,
        "2/loss": 12.411975860595703, "2/pseudo": 2.561677932739258, "3/dcl_concept": 3.3293676376342773,
        "3/dcl_instance": 5.228127479553223, "3/loss": 11.0731782913208, "3/pseudo": 2.5156829357147217,
        "prototypes": 3.584089517593384, "queue/image": -15.614189147949219,
        "queue/image_concept": 25.766498565673828, "queue/text": 33.44580841064453,
        "queue/text_concept": 26.140827178955078,
    },
    "learned": {
        "0/dcl_concept": 4.2663984298706055, "0/dcl_instance": 3.587613582611084, "0/loss": 12.49681282043457,
        "0/pseudo": 4.642801284790039, "1/dcl_concept": 3.767388343811035, "1/dcl_instance": 4.374863147735596,
        "1/loss": 11.626748085021973, "1/pseudo": 3.4844961166381836, "2/dcl_concept": 2.981006145477295,
        "2/dcl_instance": 4.884047985076904, "2/loss": 10.864578247070312, "2/pseudo": 2.9995245933532715,
        "3/dcl_concept": 3.4001998901367188, "3/dcl_instance": 4.4049906730651855, "3/loss": 11.112375259399414,
        "3/pseudo": 3.3071846961975098, "prototypes": 2.220428943634033, "queue/image": -12.643098831176758,
        "queue/image_concept": 25.122520446777344, "queue/text": 34.71890640258789,
        "queue/text_concept": 25.86945343017578,
    },
    "no_concept": {
        "0/dcl_instance": 3.6327061653137207, "0/loss": 3.6327061653137207, "1/dcl_instance": 4.301283836364746,
        "1/loss": 4.301283836364746, "2/dcl_instance": 6.268322944641113, "2/loss": 6.268322944641113,
        "3/dcl_instance": 5.228127479553223, "3/loss": 5.228127479553223, "queue/image": -15.614189147949219,
        "queue/text": 33.44580841064453,
    },
    "no_queue": {
        "0/dcl_concept": 4.901589393615723, "0/dcl_instance": 3.990102767944336, "0/loss": 13.454580307006836,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 3.024209499359131, "1/dcl_instance": 2.699103355407715,
        "1/loss": 9.46779727935791, "1/pseudo": 3.7444844245910645, "2/dcl_concept": 2.7763068675994873,
        "2/dcl_instance": 2.608422040939331, "2/loss": 8.677850723266602, "2/pseudo": 3.293121576309204,
        "3/dcl_concept": 2.448730945587158, "3/dcl_instance": 6.105250358581543, "3/loss": 11.717761993408203,
        "3/pseudo": 3.163780689239502, "prototypes": 2.4480481147766113,
    },
    "sinkhorn_batch_only": {
        "0/dcl_concept": 4.528564453125, "0/dcl_instance": 3.6327061653137207, "0/loss": 12.72415828704834,
        "0/pseudo": 4.562888145446777, "1/dcl_concept": 3.3644466400146484, "1/dcl_instance": 4.301283836364746,
        "1/loss": 11.3988037109375, "1/pseudo": 3.7330727577209473, "2/dcl_concept": 3.4487555027008057,
        "2/dcl_instance": 6.268322944641113, "2/loss": 12.972696304321289, "2/pseudo": 3.255618095397949,
        "3/dcl_concept": 3.1357972621917725, "3/dcl_instance": 5.228127479553223, "3/loss": 11.411369323730469,
        "3/pseudo": 3.0474443435668945, "prototypes": 2.2847142219543457, "queue/image": -15.614189147949219,
        "queue/image_concept": 25.940780639648438, "queue/text": 33.44580841064453,
        "queue/text_concept": 26.315757751464844,
    },
    "triplet": {
        "0/loss": 10.403099060058594, "0/pseudo": 4.562888145446777, "0/triplet_concept": 3.217008590698242,
        "0/triplet_instance": 2.623201847076416, "1/loss": 8.716010093688965, "1/pseudo": 3.650204658508301,
        "1/triplet_concept": 2.4344515800476074, "1/triplet_instance": 2.6313538551330566,
        "2/loss": 4.6359758377075195, "2/pseudo": 3.364694833755493, "2/triplet_concept": 0.7056610584259033,
        "2/triplet_instance": 0.5656198263168335, "3/loss": 4.263391494750977, "3/pseudo": 2.9786558151245117,
        "3/triplet_concept": 0.6146915555000305, "3/triplet_instance": 0.6700441837310791,
        "prototypes": 2.07393741607666, "queue/image": -15.662195205688477, "queue/text": 36.736305236816406,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_equal_the_recorded_ones(name):
    got = train_and_record(CONFIGS[name])
    want = GOLDEN[name]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-6, abs=2e-6), key


if __name__ == "__main__":  # prints GOLDEN from the current code
    import pprint

    pprint.pprint({name: train_and_record(overrides) for name, overrides in CONFIGS.items()}, width=120)
