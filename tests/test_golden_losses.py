"""The training losses of fixed small models on fixed batches, against numbers recorded once.

Each configuration builds a tiny CODER from a fixed seed, trains it a few SGD steps (so that
the queues fill partly and the prototypes and momentum encoders move) and records every loss
term of every step and a checksum of the queues and prototypes. GOLDEN holds the numbers the
code computed before model.py was restructured (forward written as the loss equation, the
updates inside the forward, no Sinkhorn kernel cache); a change of behaviour changes them.
"""

import pytest
import torch
import torch.nn.functional as F

import model as M
import trainer

N_CONCEPTS, CONCEPT_DIM, IMAGE_DIM, VOCAB, BATCH = 10, 12, 24, 40, 8

# Every model value, spelled out, so that no default of the train scripts changes the numbers.
BASE = dict(
    embed_dim=32,
    image_dim=IMAGE_DIM,
    image_pooling="attn",
    text_pooling="attn",
    text_encoder="bigru",
    vocab_size=VOCAB,
    word_dim=16,
    word_vectors="",
    bert_path="",
    bert_length_groups=1,
    bert_frozen_layers=0,
    l2norm_before_pooling=False,
    concept_branch=True,
    gcn_hidden=24,
    concept_score_scale=10.0,
    concept_query_input="detach",
    label_mix_ratio=0.35,
    momentum_gcn=True,
    batch_norm=True,
    momentum=0.9,
    queue_size=40,
    num_prototypes=16,
    sinkhorn_epsilon=0.05,
    sinkhorn_iterations=3,
    sinkhorn_with_queue=True,
    prototype_momentum=0.9,
    prototype_init="random",
    prototype_update="ema",
    loss="dcl",
    tau=0.05,
    beta=0.0,
    beta_warmup_epochs=0,
    beta_adaptive=False,
    dcl_weight_groups="joint",
    false_negative_threshold=0.0,
    margin=0.2,
    triplet_all_negatives_epochs=0,
    region_drop=0.0,
    lambda_concept=1.0,
    lambda_pseudo=1.0,
    lambda_fused=0.0,
    lambda_kl=0.0,
    pseudo_label_loss=True,
    tau_pseudo=0.1,
    mu=0.15,
    fusion="concat",
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
    "cvse": dict(
        loss="triplet",
        queue_size=0,
        pseudo_label_loss=False,
        concept_query_input="bn",
        fusion="weighted_sum",
        lambda_fused=0.6,
        lambda_concept=0.2,
        lambda_kl=0.4,
    ),
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
    """Each step's losses (f"{step}/{name}") and the queue and prototype sums after the steps.
    One thread: the rounding of a sum over threads depends on their number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_record(overrides, steps)
    finally:
        torch.set_num_threads(threads)


def _train_and_record(overrides: dict, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = M.ModelConfig(**{**BASE, **overrides})
    model = M.CODER(cfg, *concept_graph()) if cfg.concept_branch else M.CODER(cfg)
    optimizer = torch.optim.SGD(trainer.param_groups(model, 0.5, 0.0, 1.0), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model.train()
    record = {}
    for step in range(steps):
        model.set_epoch(step // 2)
        losses, _ = trainer.training_step(
            model, model, optimizer, scaler, batch_of(step), None, 1.0, clip_scope="branch"
        )
        record.update(
            {f"{step}/{name}": float(value.detach()) for name, value in losses.items() if not name.startswith("diag_")}
        )
    for name in model.queues.names:
        record[f"queue/{name}"] = float(model.queues.entries(name).sum())
    if model.prototypes is not None:  # as the next loss reads them (learned ones on the unit sphere)
        record["prototypes"] = float(F.normalize(model.prototypes.weight.detach(), dim=1).sum())
    return record


# Recorded by train_and_record from the code before model.py was restructured (commit 3e4e391:
# after_optimizer_step, the Sinkhorn kernel cache), on one thread.
GOLDEN: dict[str, dict[str, float]] = {
    "infonce": {
        "0/dcl_instance": 3.6327064037323,
        "0/dcl_concept": 4.528563499450684,
        "0/pseudo": 4.562888145446777,
        "0/loss": 12.72415828704834,
        "1/dcl_instance": 4.301283836364746,
        "1/dcl_concept": 3.364445686340332,
        "1/pseudo": 3.6198043823242188,
        "1/loss": 11.285533905029297,
        "2/dcl_instance": 6.2683234214782715,
        "2/dcl_concept": 3.4890153408050537,
        "2/pseudo": 3.273334264755249,
        "2/loss": 13.030673027038574,
        "3/dcl_instance": 5.228127956390381,
        "3/dcl_concept": 3.138659715652466,
        "3/pseudo": 3.0440235137939453,
        "3/loss": 11.410811424255371,
        "queue/image": -15.614189147949219,
        "queue/text": 33.44580841064453,
        "queue/image_concept": 25.803260803222656,
        "queue/text_concept": 26.18091583251953,
        "prototypes": 1.7115050554275513,
    },
    "no_concept": {
        "0/dcl_instance": 3.6327064037323,
        "0/loss": 3.6327064037323,
        "1/dcl_instance": 4.301283836364746,
        "1/loss": 4.301283836364746,
        "2/dcl_instance": 6.2683234214782715,
        "2/loss": 6.2683234214782715,
        "3/dcl_instance": 5.228127956390381,
        "3/loss": 5.228127956390381,
        "queue/image": -15.614189147949219,
        "queue/text": 33.44580841064453,
    },
    "beta5": {
        "0/dcl_instance": 3.990102767944336,
        "0/dcl_concept": 4.90158748626709,
        "0/pseudo": 4.562888145446777,
        "0/loss": 13.454578399658203,
        "1/dcl_instance": 4.711801528930664,
        "1/dcl_concept": 3.732797384262085,
        "1/pseudo": 3.632582187652588,
        "1/loss": 12.077180862426758,
        "2/dcl_instance": 7.227883815765381,
        "2/dcl_concept": 3.765174150466919,
        "2/pseudo": 3.303736925125122,
        "2/loss": 14.296794891357422,
        "3/dcl_instance": 5.978886127471924,
        "3/dcl_concept": 3.5247044563293457,
        "3/pseudo": 3.085444211959839,
        "3/loss": 12.589035034179688,
        "queue/image": -15.616246223449707,
        "queue/text": 32.73773956298828,
        "queue/image_concept": 25.770179748535156,
        "queue/text_concept": 26.116554260253906,
        "prototypes": 1.9082858562469482,
    },
    "beta5_warmup": {
        "0/dcl_instance": 3.6327064037323,
        "0/dcl_concept": 4.528563499450684,
        "0/pseudo": 4.562888145446777,
        "0/loss": 12.72415828704834,
        "1/dcl_instance": 4.301283836364746,
        "1/dcl_concept": 3.364445686340332,
        "1/pseudo": 3.6198043823242188,
        "1/loss": 11.285533905029297,
        "2/dcl_instance": 6.608380317687988,
        "2/dcl_concept": 3.6338629722595215,
        "2/pseudo": 3.273334264755249,
        "2/loss": 13.51557731628418,
        "3/dcl_instance": 5.665972709655762,
        "3/dcl_concept": 3.2950520515441895,
        "3/pseudo": 3.0473265647888184,
        "3/loss": 12.008352279663086,
        "queue/image": -15.612335205078125,
        "queue/text": 33.432899475097656,
        "queue/image_concept": 25.803375244140625,
        "queue/text_concept": 26.17704963684082,
        "prototypes": 1.9429627656936646,
    },
    "beta5_adaptive": {
        "0/dcl_instance": 4.395228385925293,
        "0/dcl_concept": 5.458297252655029,
        "0/pseudo": 4.562888145446777,
        "0/loss": 14.416413307189941,
        "1/dcl_instance": 5.3770432472229,
        "1/dcl_concept": 4.481561183929443,
        "1/pseudo": 3.683382987976074,
        "1/loss": 13.541987419128418,
        "2/dcl_instance": 8.59693431854248,
        "2/dcl_concept": 4.334465980529785,
        "2/pseudo": 3.3973734378814697,
        "2/loss": 16.328773498535156,
        "3/dcl_instance": 6.529500961303711,
        "3/dcl_concept": 4.3013763427734375,
        "3/pseudo": 3.2877516746520996,
        "3/loss": 14.118629455566406,
        "queue/image": -15.637134552001953,
        "queue/text": 31.599584579467773,
        "queue/image_concept": 25.587642669677734,
        "queue/text_concept": 25.932395935058594,
        "prototypes": 1.708711862564087,
    },
    "beta5_separate": {
        "0/dcl_instance": 3.990102767944336,
        "0/dcl_concept": 4.90158748626709,
        "0/pseudo": 4.562888145446777,
        "0/loss": 13.454578399658203,
        "1/dcl_instance": 4.640808582305908,
        "1/dcl_concept": 3.718280792236328,
        "1/pseudo": 3.632582187652588,
        "1/loss": 11.991670608520508,
        "2/dcl_instance": 7.1822896003723145,
        "2/dcl_concept": 3.7516026496887207,
        "2/pseudo": 3.305398464202881,
        "2/loss": 14.239290237426758,
        "3/dcl_instance": 5.819866180419922,
        "3/dcl_concept": 3.447538375854492,
        "3/pseudo": 3.0849997997283936,
        "3/loss": 12.352404594421387,
        "queue/image": -15.61805534362793,
        "queue/text": 32.75756072998047,
        "queue/image_concept": 25.775436401367188,
        "queue/text_concept": 26.115234375,
        "prototypes": 1.9091606140136719,
    },
    "beta5_false_negatives": {
        "0/dcl_instance": 2.97110652923584,
        "0/dcl_concept": 1.5000114440917969,
        "0/pseudo": 4.562888145446777,
        "0/loss": 9.034006118774414,
        "1/dcl_instance": 3.337839126586914,
        "1/dcl_concept": 0.6742674708366394,
        "1/pseudo": 3.7050256729125977,
        "1/loss": 7.717132091522217,
        "2/dcl_instance": 5.34541130065918,
        "2/dcl_concept": 0.7921181321144104,
        "2/pseudo": 3.1378629207611084,
        "2/loss": 9.275392532348633,
        "3/dcl_instance": 4.267274856567383,
        "3/dcl_concept": 0.09680241346359253,
        "3/pseudo": 3.006248712539673,
        "3/loss": 7.370326042175293,
        "queue/image": -15.511789321899414,
        "queue/text": 32.79899597167969,
        "queue/image_concept": 25.714542388916016,
        "queue/text_concept": 26.446256637573242,
        "prototypes": 1.9206717014312744,
    },
    "no_queue": {
        "0/dcl_instance": 3.990102767944336,
        "0/dcl_concept": 4.90158748626709,
        "0/pseudo": 4.562888145446777,
        "0/loss": 13.454578399658203,
        "1/dcl_instance": 2.6991031169891357,
        "1/dcl_concept": 3.02420973777771,
        "1/pseudo": 3.7444849014282227,
        "1/loss": 9.467798233032227,
        "2/dcl_instance": 2.608421802520752,
        "2/dcl_concept": 2.7763140201568604,
        "2/pseudo": 3.293121337890625,
        "2/loss": 8.677857398986816,
        "3/dcl_instance": 6.105250358581543,
        "3/dcl_concept": 2.44873046875,
        "3/pseudo": 3.1637797355651855,
        "3/loss": 11.71776008605957,
        "prototypes": 2.4480483531951904,
    },
    "sinkhorn_batch_only": {
        "0/dcl_instance": 3.6327064037323,
        "0/dcl_concept": 4.528563499450684,
        "0/pseudo": 4.562888145446777,
        "0/loss": 12.72415828704834,
        "1/dcl_instance": 4.301283836364746,
        "1/dcl_concept": 3.364445686340332,
        "1/pseudo": 3.733072519302368,
        "1/loss": 11.398801803588867,
        "2/dcl_instance": 6.2683234214782715,
        "2/dcl_concept": 3.4487576484680176,
        "2/pseudo": 3.25561785697937,
        "2/loss": 12.972699165344238,
        "3/dcl_instance": 5.228127956390381,
        "3/dcl_concept": 3.135796308517456,
        "3/pseudo": 3.047445297241211,
        "3/loss": 11.411369323730469,
        "queue/image": -15.614189147949219,
        "queue/text": 33.44580841064453,
        "queue/image_concept": 25.940776824951172,
        "queue/text_concept": 26.315753936767578,
        "prototypes": 2.2847142219543457,
    },
    "keys_init": {
        "0/dcl_instance": 3.6327064037323,
        "0/dcl_concept": 4.528563499450684,
        "0/loss": 8.161270141601562,
        "1/dcl_instance": 4.301283836364746,
        "1/dcl_concept": 3.3243484497070312,
        "1/pseudo": 2.946045398712158,
        "1/loss": 10.571678161621094,
        "2/dcl_instance": 6.2683234214782715,
        "2/dcl_concept": 3.5819756984710693,
        "2/pseudo": 2.561678409576416,
        "2/loss": 12.411977767944336,
        "3/dcl_instance": 5.228127956390381,
        "3/dcl_concept": 3.3293683528900146,
        "3/pseudo": 2.515683650970459,
        "3/loss": 11.073179244995117,
        "queue/image": -15.614189147949219,
        "queue/text": 33.44580841064453,
        "queue/image_concept": 25.766498565673828,
        "queue/text_concept": 26.140830993652344,
        "prototypes": 3.5840892791748047,
    },
    "learned": {
        "0/dcl_instance": 3.587613821029663,
        "0/dcl_concept": 4.2663984298706055,
        "0/pseudo": 4.642801284790039,
        "0/loss": 12.496813774108887,
        "1/dcl_instance": 4.3748626708984375,
        "1/dcl_concept": 3.7673897743225098,
        "1/pseudo": 3.4844961166381836,
        "1/loss": 11.626748085021973,
        "2/dcl_instance": 4.8840484619140625,
        "2/dcl_concept": 2.981004476547241,
        "2/pseudo": 2.9995245933532715,
        "2/loss": 10.864578247070312,
        "3/dcl_instance": 4.404991149902344,
        "3/dcl_concept": 3.4001996517181396,
        "3/pseudo": 3.307183265686035,
        "3/loss": 11.112374305725098,
        "queue/image": -12.643095970153809,
        "queue/text": 34.718902587890625,
        "queue/image_concept": 25.122522354125977,
        "queue/text_concept": 25.869457244873047,
        "prototypes": 2.220428228378296,
    },
    "triplet": {
        "0/triplet_instance": 2.623201847076416,
        "0/triplet_concept": 3.2170088291168213,
        "0/pseudo": 4.562888145446777,
        "0/loss": 10.403099060058594,
        "1/triplet_instance": 2.6313538551330566,
        "1/triplet_concept": 2.434451103210449,
        "1/pseudo": 3.650204658508301,
        "1/loss": 8.716009140014648,
        "2/triplet_instance": 0.5656198859214783,
        "2/triplet_concept": 0.7056606411933899,
        "2/pseudo": 3.3646950721740723,
        "2/loss": 4.6359758377075195,
        "3/triplet_instance": 0.6700442433357239,
        "3/triplet_concept": 0.6146917343139648,
        "3/pseudo": 2.9786553382873535,
        "3/loss": 4.263391494750977,
        "queue/image": -15.66219711303711,
        "queue/text": 36.73630905151367,
        "prototypes": 2.0739381313323975,
    },
    "cvse": {
        "0/triplet_instance": 0.653660774230957,
        "0/triplet_concept": 0.7750197649002075,
        "0/triplet_fused": 0.6908660531044006,
        "0/concept_kl": 3.4267239570617676,
        "0/loss": 2.593873977661133,
        "1/triplet_instance": 0.6246905326843262,
        "1/triplet_concept": 0.6273223757743835,
        "1/triplet_fused": 0.6356483697891235,
        "1/concept_kl": 2.4351305961608887,
        "1/loss": 2.1055963039398193,
        "2/triplet_instance": 0.6127519607543945,
        "2/triplet_concept": 0.6242643594741821,
        "2/triplet_fused": 0.5894322395324707,
        "2/concept_kl": 1.2419365644454956,
        "2/loss": 1.5880389213562012,
        "3/triplet_instance": 0.6715055704116821,
        "3/triplet_concept": 0.6500402688980103,
        "3/triplet_fused": 0.6999775171279907,
        "3/concept_kl": 1.78971529006958,
        "3/loss": 1.9373862743377686,
    },
    "dcl_fused_kl": {
        "0/dcl_instance": 3.990102767944336,
        "0/dcl_concept": 4.90158748626709,
        "0/pseudo": 4.562888145446777,
        "0/dcl_fused": 3.8048839569091797,
        "0/concept_kl": 3.4267239570617676,
        "0/loss": 28.29595375061035,
        "1/dcl_instance": 4.598897933959961,
        "1/dcl_concept": 4.346238136291504,
        "1/pseudo": 4.04091739654541,
        "1/dcl_fused": 4.392451286315918,
        "1/concept_kl": 2.950591564178467,
        "1/loss": 29.113998413085938,
        "2/dcl_instance": 7.136786460876465,
        "2/dcl_concept": 4.398446083068848,
        "2/pseudo": 3.747544765472412,
        "2/dcl_fused": 6.467045783996582,
        "2/concept_kl": 1.9857208728790283,
        "2/loss": 36.66963577270508,
        "3/dcl_instance": 5.782115936279297,
        "3/dcl_concept": 3.8070950508117676,
        "3/pseudo": 3.7041049003601074,
        "3/dcl_fused": 5.140739440917969,
        "3/concept_kl": 1.883720874786377,
        "3/loss": 30.599254608154297,
        "queue/image": -15.622136116027832,
        "queue/text": 32.79173278808594,
        "queue/image_concept": 26.910457611083984,
        "queue/text_concept": 25.635345458984375,
        "prototypes": 1.687538981437683,
    },
    "gpo_no_bn": {
        "0/dcl_instance": 2.6173694133758545,
        "0/dcl_concept": 1.9562510251998901,
        "0/pseudo": 4.215349197387695,
        "0/loss": 8.788969039916992,
        "1/dcl_instance": 3.857778310775757,
        "1/dcl_concept": 2.3512678146362305,
        "1/pseudo": 3.209237813949585,
        "1/loss": 9.41828441619873,
        "2/dcl_instance": 4.735227584838867,
        "2/dcl_concept": 2.345935583114624,
        "2/pseudo": 3.309082508087158,
        "2/loss": 10.39024543762207,
        "3/dcl_instance": 4.253961563110352,
        "3/dcl_concept": 2.290788173675537,
        "3/pseudo": 3.068305492401123,
        "3/loss": 9.613055229187012,
        "queue/image": 115.0066146850586,
        "queue/text": -24.124500274658203,
        "queue/image_concept": 67.90846252441406,
        "queue/text_concept": 67.70723724365234,
        "prototypes": 6.855034828186035,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_losses_equal_the_recorded_ones(name):
    got = train_and_record(CONFIGS[name])
    want = GOLDEN[name]
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


if __name__ == "__main__":  # prints GOLDEN from the current code
    import pprint

    pprint.pprint({name: train_and_record(overrides) for name, overrides in CONFIGS.items()}, width=120)
