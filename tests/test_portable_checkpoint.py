"""A checkpoint of a BERT model travels: it holds its text encoder's config and tokenizer files,
so after its BERT folder is renamed it still evaluates, retrieves, serves and resumes. Loading
for inference builds the online encoders only. A checkpoint without those files names
--bert_path, which points every loader at the moved folder."""

import shutil

import pytest
import torch

import checkpoint as C
import evaluation
import retrieve
import vocab
from conftest import ONE_EPOCH_ARGS, run_script, tiny_demo_args
from utils import CoderError

CAPTIONS = ["a dog on the grass", "the cat, a dog.", "zebra 42"]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """A 1-epoch BERT run whose BERT folder is renamed afterwards; the captions' embeddings
    and token ids of its best.pt, taken while the folder was still in place, from the full
    model (momentum encoders and queues included) built as training builds it."""
    root = tmp_path_factory.mktemp("portable")
    bert = root / "bert"
    shutil.copytree(tiny_bert, bert)
    demo = tiny_demo_args(root / "demo", seed=2, num_train=24, num_eval=10)
    run_script(
        "train_f30k.py",
        *demo,
        *ONE_EPOCH_ARGS,
        "--text_encoder",
        "bert",
        "--bert_path",
        str(bert),
        "--run_dir",
        str(root / "run"),
    )
    best = root / "run" / "best.pt"
    state = C.load_checkpoint(best)
    config = C.saved_config(state)
    full = C.build_model(config, state["image_dim"], 0, C.concept_graph_from_state(state["concept_graph"]))
    C.load_state_strict(full, state["model"], str(best))
    tokenizer = vocab.BertTokenizer(str(bert))
    ids = [tokenizer.encode(c) for c in CAPTIONS]
    want = encode(full.eval(), ids, state)
    moved = root / "bert_moved"
    bert.rename(moved)
    return {
        "root": root,
        "best": best,
        "last": root / "run" / "last.pt",
        "demo": demo,
        "moved": moved,
        "ids": ids,
        "want": want,
    }


def encode(model, ids, state):
    """Fused caption embeddings of token id lists (concept labels from the checkpoint's graph)."""
    graph = C.concept_graph_from_state(state["concept_graph"])
    lengths = torch.tensor([len(i) for i in ids])
    tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
    for row, i in enumerate(ids):
        tokens[row, : len(i)] = torch.tensor(i)
    mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).long()
    labels = torch.stack([torch.from_numpy(graph.multi_hot(vocab.tokenize(c))) for c in CAPTIONS]).float()
    with torch.no_grad():
        captions = {"tokens": tokens, "lengths": lengths, "attention_mask": mask, "concept_labels": labels}
        return model.fuse(*model.encode_captions(captions))


def test_inference_needs_no_bert_folder_and_builds_the_online_encoders_only(trained):
    model, tokenizer, _, config = C.load_for_inference(trained["best"])
    assert not (trained["root"] / "bert").exists()
    assert [tokenizer.encode(c) for c in CAPTIONS] == trained["ids"]
    assert len(model.momentum) == 0 and model.queues is None and model.prototypes is None
    assert torch.equal(encode(model, trained["ids"], C.load_checkpoint(trained["best"])), trained["want"])


def test_eval_and_retrieve_after_the_folder_moved(trained, capsys):
    data_path = trained["demo"][1]
    result = evaluation.main(["--checkpoint", str(trained["best"]), "--workers", "0", "--device", "cpu"], "f30k")
    assert result["metrics"]["rsum"] > 0
    retrieve.main(
        ["--checkpoint", str(trained["best"]), "--data_path", data_path, "--query", "a dog", "--device", "cpu"]
    )
    assert "query: a dog" in capsys.readouterr().out


def test_serve_loads_after_the_folder_moved(trained, tmp_path):
    import backbones
    import serve
    from test_serve import TinyBackbone, make_photo

    for i in range(3):
        make_photo(tmp_path / "photos" / f"p{i}.png", seed=i)
    args = serve.build_parser().parse_args(
        [
            "--checkpoint",
            str(trained["best"]),
            "--images",
            str(tmp_path / "photos"),
            "--backbone",
            "tiny-test",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
        ]
    )
    backbones.BACKBONES["tiny-test"] = TinyBackbone
    try:
        photos, _ = serve.build_index(args)
    finally:
        backbones.BACKBONES.pop("tiny-test")
    assert len(photos.gallery.photos) == 3


def test_resume_after_the_folder_moved(trained, tmp_path):
    last = tmp_path / "last.pt"  # a resumed run continues in its checkpoint's folder
    shutil.copyfile(trained["last"], last)
    run_script("train_f30k.py", "--resume", str(last), "--epochs", "2")
    state = C.load_checkpoint(last)
    assert state["epoch"] == 2 and C._is_file_dict(state["text_encoder_files"])


def test_a_checkpoint_without_the_files_names_bert_path_and_takes_it(trained, tmp_path, capsys):
    state = C.load_checkpoint(trained["best"])
    del state["text_encoder_files"]
    old = tmp_path / "old.pt"
    C.save_checkpoint(old, state)
    with pytest.raises(CoderError, match=r"holds no copy of its text encoder.*pass --bert_path DIR") as err:
        C.load_for_inference(old)
    assert "\n" not in str(err.value)
    model, tokenizer, _, _ = C.load_for_inference(old, bert_path=str(trained["moved"]))
    assert torch.equal(encode(model, trained["ids"], state), trained["want"])
    result = evaluation.main(
        ["--checkpoint", str(old), "--workers", "0", "--device", "cpu", "--bert_path", str(trained["moved"])], "f30k"
    )
    assert result["metrics"]["rsum"] > 0
    proc = run_script(
        "train_f30k.py", "--resume", str(old), "--epochs", "2", "--run_dir", str(tmp_path / "r"), check=False
    )
    assert proc.returncode == 2 and "pass --bert_path DIR" in proc.stderr and proc.stderr.count("\n") == 1
    run_script(
        "train_f30k.py",
        "--resume",
        str(old),
        "--epochs",
        "2",
        "--run_dir",
        str(tmp_path / "r"),
        "--bert_path",
        str(trained["moved"]),
    )
    assert C._is_file_dict(C.load_checkpoint(tmp_path / "r" / "last.pt")["text_encoder_files"])


@pytest.mark.parametrize(
    "files",
    [
        {"../config.json": torch.zeros(2, dtype=torch.uint8)},
        {"vocab.txt": torch.zeros(2, dtype=torch.uint8)},
        {"config.json": torch.zeros(2)},
    ],
)
def test_bad_text_encoder_files_are_refused_in_one_line(trained, tmp_path, files):
    state = C.load_checkpoint(trained["best"])
    state["text_encoder_files"] = files
    bad = tmp_path / "bad.pt"
    C.save_checkpoint(bad, state)
    with pytest.raises(CoderError, match="text_encoder_files' is not a dict of plain file names"):
        C.load_for_inference(bad)
