"""The training step reads nothing back from the device anywhere below it: not in the project
(tests/test_trainer.py), and not in the code of torch or transformers that it calls, where a
read of a CUDA tensor makes the host wait for the GPU (the waits that
torch.cuda.set_sync_debug_mode("error") reports; bench/gpu_check.sh runs that on a GPU). On a
CPU every tensor is on the host, so a read is caught by where it happens: only reads of a
packed sequence's batch sizes (torch/nn/modules/rnn.py), which torch always keeps on the host,
and of AdamW's step counters (torch/optim/), host tensors unless `capturable`, are expected."""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import encoders as E
import trainer
from test_model import build, make_batch, small_config

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
HOST_TENSORS = ("torch/nn/modules/rnn.py", "torch/optim/")  # batch sizes, AdamW's step counts


def reads_during(monkeypatch, work) -> list[str]:
    """Every read of a tensor's value during `work()`, by anyone, as 'method file:line'."""
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, _name=name, _original=original, **kwargs):
            frame = sys._getframe(1)
            reads.append(f"{_name} {frame.f_code.co_filename}:{frame.f_lineno}")
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    try:
        work()
    finally:
        monkeypatch.undo()
    return reads


def unexpected(reads: list[str]) -> list[str]:
    return sorted({r for r in reads if not any(part in r.replace("\\", "/") for part in HOST_TENSORS)})


def test_the_spy_sees_a_read_inside_torch(monkeypatch):
    """torch's own unsorted packing reads its permutation back (`.cpu()` in pad_packed_sequence)."""

    def unsorted_packing():
        packed = pack_padded_sequence(
            torch.randn(3, 4, 2), torch.tensor([2, 4, 3]), batch_first=True, enforce_sorted=False
        )
        pad_packed_sequence(packed, batch_first=True)

    found = unexpected(reads_during(monkeypatch, unsorted_packing))
    assert found and all("torch/nn/utils/rnn.py" in r for r in found)


@pytest.mark.parametrize("text_encoder", ["bigru", "bert"])
def test_a_training_step_reads_nothing_back_in_torch_or_transformers(monkeypatch, tiny_bert, text_encoder):
    """A full trainer.training_step after warm-up, the Bi-GRU model and the BERT one."""
    overrides = {"text_encoder": "bert", "bert_path": tiny_bert} if text_encoder == "bert" else {}
    model = build(small_config(**overrides)).train()
    optimizer = torch.optim.AdamW(trainer.param_groups(model, 1e-3, 1e-4, 0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [make_batch(seed=seed, first_image=4 * seed) for seed in range(4)]

    def step(seed):
        return trainer.training_step(model, model, optimizer, scaler, batches[seed], None, 2.0, clip_scope="branch")

    for seed in range(3):
        step(seed)
    result = {}
    reads = reads_during(monkeypatch, lambda: result.update(out=step(3)))
    assert unexpected(reads) == []
    assert torch.isfinite(result["out"][0]["loss"])


def test_the_gru_encoder_equals_each_caption_run_alone():
    """Sorting on the host changes no output: each caption's pooled embedding is that of the
    BiGRU run over its own tokens alone (no padding, no packing), directions averaged."""
    torch.manual_seed(0)
    enc = E.GRUTextEncoder(30, 8, 16, "mean", l2norm_items=False).eval()
    lengths = torch.tensor([3, 5, 1, 5, 2, 4])
    tokens = torch.randint(1, 30, (6, 5)) * (torch.arange(5)[None, :] < lengths[:, None])
    mask = (tokens > 0).long()
    with torch.no_grad():
        got = enc(tokens, lengths, mask)
        for row, n in enumerate(lengths.tolist()):
            out, _ = enc.gru(enc.embed(tokens[row : row + 1, :n]))
            want = F.normalize(((out[..., :16] + out[..., 16:]) / 2).mean(1), dim=-1)
            assert torch.allclose(got[row], want[0], atol=1e-6)


def test_bert_layers_run_directly_equal_the_transformers_forward(tiny_bert):
    """The BERT encoder runs the embeddings and layers itself with an additive mask; the real
    tokens' states equal those of the transformers model's own forward with its 2-D mask."""
    torch.manual_seed(0)
    enc = E.BertTextEncoder(tiny_bert, 16, "mean", length_groups=1, frozen_layers=0, l2norm_items=False).eval()
    tokens = torch.tensor([[2, 9, 7, 3, 0, 0], [2, 10, 11, 8, 9, 3], [2, 3, 0, 0, 0, 0]])
    mask = (tokens > 0).long()
    captured = {}
    enc.fc.register_forward_hook(lambda module, args, out: captured.update(hidden=args[0]))
    with torch.no_grad():
        enc(tokens, mask.sum(1), mask)
        want = enc.bert(input_ids=tokens, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(captured["hidden"][real], want[real], atol=1e-5)
