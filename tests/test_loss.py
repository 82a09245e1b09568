"""The multi-token loss: head-sequential == naive == a hand-written reference, targets, and the
fused chunked linear cross-entropy. Float32, tiny shapes, CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtp_pretrain.loss import (IGNORE_INDEX, GradSyncHooks, evaluate_loss, head_sequential_loss, head_targets,
                               mtp_loss, naive_loss)
from mtp_pretrain.model.config import ModelConfig
from mtp_pretrain.model.transformer import MTPTransformer
from mtp_pretrain.ops import linear_cross_entropy

VOCAB, B, L = 61, 3, 13  # inputs T = L - 1 = 12, so B*T = 36 tokens per head
RTOL = 1e-5
HEAD_TYPES = ("transformer", "linear", "causal")


def make_model(n_future: int, head_type: str, tie: bool = False, seed: int = 0, **kw) -> MTPTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_future=n_future, head_type=head_type,
                      tie_embeddings=tie, max_seq_len=64, **kw)
    return MTPTransformer(cfg).float()


def make_tokens(seed: int = 1, b: int = B, length: int = L) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def run(fn, model, tokens, **kw):
    """Run a loss implementation from zeroed gradients; return (MTPLoss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    out = fn(model, tokens, **kw)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def hand_written(model, tokens, weights=None, pad_id=None, loss_scale=1.0):
    """Reference written plainly: per-head logits from model.forward, CE_i = mean over positions
    t with t+i inside the batch (and not padding) of -log p_i(tokens[t+i]), loss = sum w_i CE_i."""
    model.zero_grad(set_to_none=True)
    n, T = model.n_future, tokens.shape[1] - 1
    weights = [1.0] * n if weights is None else weights
    logits = model(tokens, seq_len=T)
    per_head = []
    for i in range(1, n + 1):
        lg = logits[i - 1][:, : L - i]  # positions that have a token i steps ahead
        tg = tokens[:, i:]
        keep = torch.ones_like(tg, dtype=torch.bool) if pad_id is None else tg != pad_id
        per_head.append(F.cross_entropy(lg[keep], tg[keep]))
    total = sum(w * l for w, l in zip(weights, per_head))
    (total * loss_scale).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return [l.detach() for l in per_head], grads


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    """max |a - e| <= rtol * max |e| (relative to the tensor's scale, robust to zero entries)."""
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= rtol * scale + 1e-12, f"{what}: max abs err {err:.3e} vs scale {scale:.3e}"


def assert_same_as_hand_written(res, model, tokens, **kw) -> None:
    """A ``run`` result has the per-head losses and every gradient of ``hand_written``."""
    per_head, grads = hand_written(model, tokens, **kw)
    for a, b in zip(res[0].per_head, per_head):
        assert_rel_close(a, b)
    for name in grads:
        assert_rel_close(res[1][name], grads[name], what=name)


def assert_same(res_a, res_b, rtol: float = RTOL) -> None:
    (out_a, grads_a), (out_b, grads_b) = res_a, res_b
    assert len(out_a.per_head) == len(out_b.per_head)
    for i, (la, lb) in enumerate(zip(out_a.per_head, out_b.per_head)):
        if torch.isnan(lb):  # a skipped (zero-weight) head: skipped by both
            assert torch.isnan(la), f"head {i + 1} ran in one implementation only"
            continue
        assert_rel_close(la, lb, rtol, f"head {i + 1} loss")
    assert_rel_close(out_a.loss, out_b.loss, rtol, "total loss")
    assert out_a.n_targets == out_b.n_targets
    assert grads_a.keys() == grads_b.keys()
    for name in grads_b:
        assert_rel_close(grads_a[name], grads_b[name], rtol, name)


# ----------------------------------------------------------------------------------------------
# head-sequential == naive == hand-written, for every head type, n, chunking and tie setting
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_head_sequential_equals_naive(n, head_type, tie):
    model, tokens = make_model(n, head_type, tie), make_tokens()
    ref = run(naive_loss, model, tokens)
    # every parameter of the model takes part in the loss
    assert ref[1].keys() == {name for name, _ in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in ref[1].values())
    assert ref[0].n_targets == [B * (L - i) for i in range(1, n + 1)]
    assert_same(run(head_sequential_loss, model, tokens), ref)
    # chunk 12 divides B*T = 36, 7 and 5 do not (a short last chunk), 36 = no chunking path, 1 = per token
    for chunk in (12, 7, 5, 1):
        assert_same(run(head_sequential_loss, model, tokens, chunk_size=chunk), ref)
        assert_same(run(naive_loss, model, tokens, chunk_size=chunk), ref)
    # ... and both match the plainly written reference
    assert_same_as_hand_written(ref, model, tokens)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_head_weights_and_loss_scale_honoured(head_type):
    model, tokens = make_model(4, head_type), make_tokens()
    weights = [1.0, 0.5, 0.25, 0.0]
    ref = run(naive_loss, model, tokens, weights=weights, loss_scale=3.0)
    assert_same(run(head_sequential_loss, model, tokens, weights=weights, loss_scale=3.0), ref)
    assert_same(run(head_sequential_loss, model, tokens, weights=weights, loss_scale=3.0, chunk_size=7), ref)
    per_head, grads = hand_written(model, tokens, weights=weights, loss_scale=3.0)
    for name in grads:
        if name.startswith("heads.3."):  # the hand-written reference backprops zeros into it
            assert grads[name].abs().max() == 0 and name not in ref[1], name
            continue
        assert_rel_close(ref[1][name], grads[name], what=name)
    # the reported loss is the weighted sum of per-head means (loss_scale only scales gradients)
    expected = sum(w * l for w, l in zip(weights[:3], ref[0].per_head[:3]))
    assert_rel_close(ref[0].loss, expected)
    # a zero-weight last head is skipped: not computed (NaN), no gradient at all for its parameters
    assert torch.isnan(ref[0].per_head[3]) and all(torch.isfinite(l) for l in ref[0].per_head[:3])
    assert any(name.startswith("heads.2.") for name in ref[1])
    # weights differ -> gradients differ (the weights are not ignored)
    unweighted = run(head_sequential_loss, model, tokens)[1]
    assert not torch.allclose(unweighted["trunk.0.attn.q_proj.weight"], ref[1]["trunk.0.attn.q_proj.weight"])


def test_head_weights_length_checked():
    model, tokens = make_model(2, "transformer"), make_tokens()
    for fn in (naive_loss, head_sequential_loss):
        with pytest.raises(ValueError, match="head_weights"):
            fn(model, tokens, weights=[1.0])


def test_mtp_loss_dispatch_and_bad_impl():
    model, tokens = make_model(2, "linear"), make_tokens()
    assert_same(run(lambda m, t: mtp_loss("head_sequential", m, t), model, tokens), run(naive_loss, model, tokens))
    with pytest.raises(ValueError, match="loss.impl"):
        mtp_loss("fast", model, tokens)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_evaluate_loss_matches_training_loss(head_type):
    model, tokens = make_model(4, head_type), make_tokens()
    out, _ = run(naive_loss, model, tokens)
    for chunk in (0, 7):
        sums, counts = evaluate_loss(model, tokens, chunk_size=chunk)
        assert counts == out.n_targets
        for s, c, l in zip(sums, counts, out.per_head):
            assert not s.requires_grad
            assert_rel_close(s / c, l)


def test_grad_sync_hooks_order():
    calls = []

    class Rec(GradSyncHooks):
        def before_head_backward(self, head, last):
            calls.append(("head", head, last))

        def before_trunk_backward(self):
            calls.append(("trunk",))

    for head_type in HEAD_TYPES:
        calls.clear()
        head_sequential_loss(make_model(3, head_type), make_tokens(), hooks=Rec())
        assert calls == [("head", 1, False), ("head", 2, False), ("head", 3, True), ("trunk",)], head_type


# ----------------------------------------------------------------------------------------------
# NTP (n_future = 1) is plain next-token cross-entropy
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_ntp_equals_plain_next_token_cross_entropy(tie):
    model, tokens = make_model(1, "transformer", tie), make_tokens()
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1])[0]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    ce.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    for fn in (naive_loss, head_sequential_loss):
        for chunk in (0, 7):
            out, grads = run(fn, model, tokens, chunk_size=chunk)
            assert len(out.per_head) == 1
            assert_rel_close(out.loss, ce.detach())
            assert_rel_close(out.per_head[0], ce.detach())
            for name in plain:
                assert_rel_close(grads[name], plain[name], what=name)


# ----------------------------------------------------------------------------------------------
# targets
# ----------------------------------------------------------------------------------------------

def test_head_targets_shift_and_ignore_tail():
    tokens = torch.arange(100, 100 + 2 * 8).reshape(2, 8)  # value encodes (row, position)
    T = 7
    targets = head_targets(tokens, T, 4)
    for i, tg in enumerate(targets, start=1):
        assert tg.shape == (2, T)
        for t in range(T):
            if t + i < 8:
                assert torch.equal(tg[:, t], tokens[:, t + i])
            else:  # no token i steps ahead inside the batch: ignored, nothing read past the end
                assert (tg[:, t] == IGNORE_INDEX).all()
        assert int((tg != IGNORE_INDEX).sum()) == 2 * (8 - i)


def test_head_targets_full_length_inputs_and_more_heads_than_tokens():
    tokens = torch.arange(6).reshape(1, 6)
    # all 6 tokens as inputs: head 1's last position has no target
    (t1,) = head_targets(tokens, 6, 1)
    assert t1.tolist() == [[1, 2, 3, 4, 5, IGNORE_INDEX]]
    # more heads than the batch can serve: the far heads get no targets at all, no error
    targets = head_targets(tokens, 5, 8)
    assert (targets[5] == IGNORE_INDEX).all() and (targets[7] == IGNORE_INDEX).all()
    assert targets[4].tolist() == [[5] + [IGNORE_INDEX] * 4]


def test_padding_ignored_in_targets_and_loss():
    pad = 0
    tokens = make_tokens(seed=5)
    tokens[tokens == pad] = 1
    tokens[0, 7:] = pad  # right padding in row 0
    tokens[2, 3] = pad
    targets = head_targets(tokens, L - 1, 3, pad_id=pad)
    for tg in targets:
        assert not (tg == pad).any()
    for head_type in HEAD_TYPES:
        model = make_model(3, head_type)
        ref = run(naive_loss, model, tokens, pad_id=pad)
        assert ref[0].n_targets == [int((tokens[:, i:] != pad).sum()) for i in (1, 2, 3)]
        assert_same(run(head_sequential_loss, model, tokens, pad_id=pad, chunk_size=5), ref)
        assert_same_as_hand_written(ref, model, tokens, pad_id=pad)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_loss_never_reads_past_the_batch(head_type):
    """Explicit seq_len = L (every token an input): the heads' last positions have no targets and
    the loss does not depend on anything outside the batch; nothing indexes out of range."""
    model, tokens = make_model(4, head_type), make_tokens()
    ref = run(naive_loss, model, tokens, seq_len=L)
    assert ref[0].n_targets == [B * (L - i) for i in range(1, 5)]
    assert_same(run(head_sequential_loss, model, tokens, seq_len=L, chunk_size=7), ref)
    # same loss as with the default seq_len = L - 1 (the extra last input position has no targets)
    assert_same(run(naive_loss, model, tokens, seq_len=L - 1), ref)
    with pytest.raises(ValueError, match="seq_len"):
        naive_loss(model, tokens, seq_len=L + 1)


def test_sequence_longer_than_max_seq_len_raises():
    model = make_model(2, "transformer")
    tokens = torch.randint(0, VOCAB, (1, 66))
    for fn in (naive_loss, head_sequential_loss):
        with pytest.raises(ValueError, match="max_seq_len"):
            fn(model, tokens)


# ----------------------------------------------------------------------------------------------
# the fused chunked linear cross-entropy
# ----------------------------------------------------------------------------------------------

def _ce_inputs(dtype, n=45, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (0.3 * torch.randn(v, d, generator=g)).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[[0, 3, 4, 20, 44]] = IGNORE_INDEX  # rows without targets, incl. the last
    t[10:15] = IGNORE_INDEX  # a whole chunk of 5 with no valid row
    return h, w, t


def _lce(h, w, t, chunk, scale=2.5):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, t, chunk_size=chunk)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, 7, 15, 44, 45, 100])
def test_linear_cross_entropy_chunked_equals_unchunked(chunk):
    h, w, t = _ce_inputs(torch.float32)
    ref = _lce(h, w, t, 0)
    # the unchunked path is plain F.cross_entropy on the logits, summed over valid rows
    plain = F.cross_entropy(h @ w.T, t, ignore_index=IGNORE_INDEX, reduction="sum")
    assert_rel_close(ref[0], plain)
    out = _lce(h, w, t, chunk)
    assert out[0].dtype == torch.float32
    for a, b, what in zip(out, ref, ("loss", "grad h", "grad weight")):
        assert_rel_close(a, b, what=what)
    # ignored rows get exactly zero input gradient
    assert (out[1][t == IGNORE_INDEX] == 0).all()


def test_linear_cross_entropy_batched_shape_and_partial_grads():
    h, w, t = _ce_inputs(torch.float32, n=48)
    h3, t3 = h.reshape(4, 12, -1), t.reshape(4, 12)
    ref = _lce(h, w, t, 0)
    out = _lce(h3, w, t3, 7)
    assert out[1].shape == h3.shape
    assert_rel_close(out[0], ref[0])
    assert_rel_close(out[1].reshape(h.shape), ref[1])
    assert_rel_close(out[2], ref[2])
    # only the weight needs a gradient (h frozen), and only h
    wr = w.clone().requires_grad_(True)
    linear_cross_entropy(h, wr, t, chunk_size=7).backward()
    assert_rel_close(wr.grad, ref[2] / 2.5)
    hr = h.clone().requires_grad_(True)
    linear_cross_entropy(hr, w, t, chunk_size=7).backward()
    assert_rel_close(hr.grad, ref[1] / 2.5)


def test_linear_cross_entropy_bf16():
    h32, w32, t = _ce_inputs(torch.float32)
    h, w = h32.bfloat16(), w32.bfloat16()
    # reference: float32 maths on the very same (bf16-representable) values
    ref = _lce(h.float(), w.float(), t, 0)
    for chunk in (0, 7, 16):
        loss, gh, gw = _lce(h, w, t, chunk)
        assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
        assert_rel_close(loss, ref[0], rtol=1e-2, what="loss")
        assert_rel_close(gh.float(), ref[1], rtol=2e-2, what="grad h")
        assert_rel_close(gw.float(), ref[2], rtol=2e-2, what="grad weight")
    # chunked vs unchunked bf16 agree at least as well
    a, b = _lce(h, w, t, 7), _lce(h, w, t, 0)
    assert_rel_close(a[0], b[0], rtol=1e-2)
    assert_rel_close(a[1].float(), b[1].float(), rtol=2e-2)
    assert_rel_close(a[2].float(), b[2].float(), rtol=2e-2)


def test_linear_cross_entropy_no_grad():
    h, w, t = _ce_inputs(torch.float32)
    ref = linear_cross_entropy(h, w, t)
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.no_grad():
        for chunk in (0, 5, 7, 45):
            out = linear_cross_entropy(hr, wr, t, chunk_size=chunk)
            assert not out.requires_grad
            assert_rel_close(out, ref)
    # no input requires grad: the plain chunked sum, same value
    out = linear_cross_entropy(h, w, t, chunk_size=7)
    assert not out.requires_grad
    assert_rel_close(out, ref)
