"""Document-aware packing: inside a packed window attention, rotary positions and every head's
targets stay inside each document (data.document_masking)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtp_pretrain.loss import IGNORE_INDEX, head_sequential_loss, head_targets, naive_loss
from mtp_pretrain.model import ModelConfig, MTPTransformer
from mtp_pretrain.model.transformer import PackedDocuments

EOS = 3
VOCAB = 40
N_FUTURE = 3


def make_model(head_type: str, seed: int = 0) -> MTPTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, n_future=N_FUTURE,
                      head_type=head_type, max_seq_len=64, init_std=0.1)
    return MTPTransformer(cfg).double().eval()


def packed_window(lengths: list[int], tail: int, seed: int) -> torch.Tensor:
    """Documents of the given lengths (each ending with EOS), then `tail` tokens of an unfinished
    one, as a window starts mid-document and ends mid-document."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in lengths:
        body = torch.randint(EOS + 1, VOCAB, (n - 1,), generator=g)
        parts += [body, torch.tensor([EOS])]
    parts.append(torch.randint(EOS + 1, VOCAB, (tail,), generator=g))
    return torch.cat(parts)


def documents_of(window: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each document in a window: cut after every EOS."""
    cuts = (window == EOS).nonzero().flatten().tolist()
    bounds, start = [], 0
    for c in cuts:
        bounds.append((start, c + 1))
        start = c + 1
    if start < len(window):
        bounds.append((start, len(window)))
    return bounds


def crosses(window: torch.Tensor, t: int, i: int) -> bool:
    """Head i's target at t lies in another document: an EOS among tokens t .. t+i-1."""
    return bool((window[t:t + i] == EOS).any())


BATCH = torch.stack([packed_window([7, 1, 12, 5], 6, seed=1), packed_window([2, 20, 3], 6, seed=2)])


def test_positions_and_mask_of_a_known_window():
    docs = PackedDocuments.from_tokens(torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9]]), EOS)
    assert docs.positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for lo, hi in [(0, 3), (3, 5), (5, 6), (6, 8)]:
        expected[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(docs.mask[0, 0], expected)


@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal"])
def test_packed_logits_equal_each_document_run_alone(head_type):
    """Every head's logits at every position of a packed window equal those of its document run
    through the model alone. Chained (causal) heads embed token t+i-1, so they match where head i's
    target stays in the document: exactly the positions whose target the loss keeps."""
    model = make_model(head_type)
    T = BATCH.shape[1]
    with torch.no_grad():
        packed = model(BATCH, document_end_id=EOS)
        unmasked = model(BATCH)
    compared = 0
    for b in range(BATCH.shape[0]):
        window = BATCH[b]
        bounds = documents_of(window)
        assert len(bounds) >= 4
        for lo, hi in bounds:
            with torch.no_grad():
                alone = model(window[lo:hi][None])
            for i in range(1, N_FUTURE + 1):
                for t in range(lo, hi):
                    if head_type == "causal" and i > 1 and (t + i - 1 >= T or crosses(window, t, i)):
                        continue
                    torch.testing.assert_close(packed[i - 1][b, t], alone[i - 1][0, t - lo], rtol=0, atol=1e-10)
                    compared += 1
    assert compared >= (T * N_FUTURE if head_type != "causal" else T * 2)
    # ... and the mask matters: plain causal attention over the window differs after the first EOS.
    first_end = int((BATCH[0] == EOS).nonzero()[0]) + 1
    assert (packed[0][0, first_end:] - unmasked[0][0, first_end:]).abs().max() > 1e-3


def test_masked_targets_are_exactly_the_crossing_ones():
    T = BATCH.shape[1] - N_FUTURE
    targets = head_targets(BATCH, T, N_FUTURE, document_end_id=EOS)
    kept_eos = 0
    for b in range(BATCH.shape[0]):
        for i in range(1, N_FUTURE + 1):
            for t in range(T):
                ignored = bool(targets[i - 1][b, t] == IGNORE_INDEX)
                assert ignored == crosses(BATCH[b], t, i), (b, i, t)
                if not ignored:
                    assert targets[i - 1][b, t] == BATCH[b, t + i]
                    kept_eos += int(BATCH[b, t + i] == EOS)
    assert kept_eos >= 2 * N_FUTURE  # the EOS ending a document stays a target for every head


@pytest.mark.parametrize("head_type", ["transformer", "causal"])
def test_both_losses_equal_the_per_document_reference(head_type):
    """Per-head mean cross-entropy over the kept targets, computed from each document run alone,
    equals both loss implementations' result; their gradients agree."""
    T = BATCH.shape[1] - N_FUTURE
    ref_sum, ref_n = torch.zeros(N_FUTURE, dtype=torch.float64), torch.zeros(N_FUTURE)
    model = make_model(head_type)
    for b in range(BATCH.shape[0]):
        window = BATCH[b]
        for lo, hi in documents_of(window[:T]):
            hi_ext = min(hi + N_FUTURE, len(window))  # the document's own later tokens are targets
            with torch.no_grad():
                alone = model(window[lo:hi_ext][None], seq_len=hi - lo)
            for i in range(1, N_FUTURE + 1):
                for t in range(lo, hi):
                    if crosses(window, t, i):
                        continue
                    ref_sum[i - 1] += F.cross_entropy(alone[i - 1][0, t - lo], window[t + i])
                    ref_n[i - 1] += 1
    reference = ref_sum / ref_n
    grads = []
    for loss_fn in (naive_loss, head_sequential_loss):
        model = make_model(head_type)
        out = loss_fn(model, BATCH, seq_len=T, document_end_id=EOS)
        assert out.n_targets == ref_n.long().tolist()
        torch.testing.assert_close(torch.stack(out.per_head).double(), reference, rtol=0, atol=1e-6)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=0, atol=1e-10)


def test_denominators_make_the_loss_independent_of_micro_batching():
    """Split into micro-batches whose kept-target counts differ, each divided by the mean count,
    the accumulated gradient equals that of the whole batch at once."""
    T = BATCH.shape[1] - N_FUTURE
    whole = make_model("transformer")
    naive_loss(whole, BATCH, seq_len=T, document_end_id=EOS)
    counts = torch.tensor([[int((t != IGNORE_INDEX).sum()) for t in head_targets(BATCH[b:b + 1], T, N_FUTURE,
                                                                                   document_end_id=EOS)]
                           for b in range(2)], dtype=torch.float64)
    assert (counts[0] != counts[1]).any()
    split = make_model("transformer")
    for b in range(2):
        head_sequential_loss(split, BATCH[b:b + 1], seq_len=T, document_end_id=EOS, loss_scale=0.5,
                             denominators=counts.mean(0).tolist())
    for (k, p), q in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-10, msg=k)


def test_validation_and_per_head_eval_use_the_same_masking():
    """The trainer's validation loss (evaluate_loss) and mtp-eval's per-head sums see the same
    document-masked targets and logits."""
    from mtp_pretrain.eval.per_head import per_head_sums
    from mtp_pretrain.loss import evaluate_loss

    model = make_model("causal")
    T = BATCH.shape[1] - N_FUTURE
    sums, counts = evaluate_loss(model, BATCH, seq_len=T, document_end_id=EOS)
    ce, _, count = per_head_sums(model, BATCH, seq_len=T, document_end_id=EOS)
    plain, _, plain_count = per_head_sums(model, BATCH, seq_len=T)
    assert count.tolist() == counts and (count < plain_count).all()
    torch.testing.assert_close(ce, torch.stack(sums).double(), rtol=1e-6, atol=1e-6)


def masked_job(tmp_path, micro: int):
    """A 1-step trainer job over 8 windows of 24 tokens of short and long byte documents (document
    masking on), in micro-batches of ``micro``; the dataset is written once per ``tmp_path``."""
    from data_tools.tokenize_corpus import tokenize_to_dataset
    from mtp_pretrain.config import (CheckpointConfig, DataConfig, DataSourceConfig, JobConfig, LoggingConfig,
                                     OptimConfig, TrainConfig, WandbConfig)
    from mtp_pretrain.data.tokenizer import ByteTokenizer

    if not (tmp_path / "ds").exists():
        ByteTokenizer().save(tmp_path / "bytes.json")
        g = torch.Generator().manual_seed(0)
        docs = []
        for k in range(120):  # runs of 1-3 character documents, then a long one
            n = 1 if k % 12 else 90
            docs.append("".join(chr(97 + int(c)) for c in torch.randint(0, 26, (int(torch.randint(1, 4, (1,), generator=g)) * n,),
                                                                      generator=g)))
        tokenize_to_dataset([{"text": t, "source": ""} for t in docs], tmp_path / "bytes.json", tmp_path / "ds",
                            source_description="t", val_fraction=0.0)
    return JobConfig(
        model=ModelConfig(vocab_size=259, dim=32, n_layers=1, n_heads=2, n_future=3, max_seq_len=64, init_std=0.5),
        data=DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "ds"))], seq_len=24, prefetch=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(max_steps=1, micro_batch_size=micro, global_batch_tokens=8 * 24, resume="never",
                          device="cpu", dtype="float32"),
        checkpoint=CheckpointConfig(dir=str(tmp_path / f"ckpt{micro}"), interval=0),
        logging=LoggingConfig(interval=1, val_interval=0, wandb=WandbConfig(mode="disabled")))


def test_trainer_step_loss_does_not_depend_on_micro_batching(tmp_path):
    """The trainer's step loss over the same 8 windows is the same with 1 micro-batch of 8 or 4
    accumulated micro-batches of 2, although document masking keeps a different number of targets
    in each micro-batch (short and long documents): every target weighs the same."""
    from mtp_pretrain.train import Trainer

    losses = []
    for micro in (8, 2):
        trainer = Trainer(masked_job(tmp_path, micro), tmp_path / f"run{micro}")
        try:
            it = iter(trainer.train_stream)
            batches = [next(it) for _ in range(trainer.grad_accum)]
            counts = [int((head_targets(b, 24, 3, document_end_id=trainer.document_end_id)[2] != IGNORE_INDEX).sum())
                      for b in batches]
            trainer.train_iter = iter(batches)
            losses.append(trainer.train_step()["loss"])
        finally:
            trainer.close()
    assert len(set(counts)) > 1  # the 2-window micro-batches keep different numbers of targets
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)


def test_trainer_builds_each_micro_batchs_targets_once(tmp_path, monkeypatch):
    """With document masking the trainer counts the step's targets before its first micro-batch;
    the loss then reuses those targets: head_targets runs once per micro-batch, on that
    micro-batch's tokens, in the trainer or in the loss."""
    from mtp_pretrain import loss as loss_module
    from mtp_pretrain import train as train_module
    from mtp_pretrain.train import Trainer

    built = []

    def counting(tokens, *args, **kwargs):
        built.append(tokens.clone())
        return head_targets(tokens, *args, **kwargs)

    monkeypatch.setattr(loss_module, "head_targets", counting)
    monkeypatch.setattr(train_module, "head_targets", counting)
    trainer = Trainer(masked_job(tmp_path, 2), tmp_path / "run")
    try:
        it = iter(trainer.train_stream)
        batches = [next(it) for _ in range(trainer.grad_accum)]
        trainer.train_iter = iter(batches)
        assert math.isfinite(trainer.train_step()["loss"])
    finally:
        trainer.close()
    assert trainer.document_end_id is not None and len(batches) == 4
    assert len(built) == len(batches), f"head_targets ran {len(built)} times for {len(batches)} micro-batches"
    for tokens, b in zip(built, batches):
        assert torch.equal(tokens, b)


def test_targets_built_by_the_caller_give_the_same_loss_and_are_checked():
    """``targets=head_targets(...)`` from the caller: the same losses and gradients as the loss
    building them itself; targets of another shape are refused, naming what is expected."""
    T = BATCH.shape[1] - N_FUTURE
    built_here, given = make_model("causal"), make_model("causal")
    a = head_sequential_loss(built_here, BATCH, seq_len=T, document_end_id=EOS)
    b = head_sequential_loss(given, BATCH, seq_len=T, document_end_id=EOS,
                             targets=head_targets(BATCH, T, N_FUTURE, document_end_id=EOS))
    assert a.n_targets == b.n_targets and torch.equal(torch.stack(a.per_head), torch.stack(b.per_head))
    for (k, p), q in zip(built_here.named_parameters(), given.parameters()):
        assert torch.equal(p.grad, q.grad), k
    with pytest.raises(ValueError, match=r"targets must be model.n_future=3 tensors of shape \[2, "):
        naive_loss(given, BATCH, seq_len=T, targets=head_targets(BATCH, T - 1, N_FUTURE))
