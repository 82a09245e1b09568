"""The MTP transformer: NTP model == plain decoder, no leakage across heads, parameter counts,
baseline matching and configuration errors. Float32, tiny shapes, CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtp_pretrain.model.config import MODEL_SIZES, ModelConfig, check_vocab, count_parameters, model_config
from mtp_pretrain.model.transformer import Block, CausalHead, LinearHead, MTPTransformer, TransformerHead

VOCAB = 53
HEAD_TYPES = ("transformer", "linear", "causal")


def make_model(n_future=1, head_type="transformer", seed=0, **kw) -> MTPTransformer:
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_seq_len=32)
    return MTPTransformer(ModelConfig(n_future=n_future, head_type=head_type, **{**base, **kw})).float()


def tokens_(b=2, length=10, seed=1):
    return torch.randint(0, VOCAB, (b, length), generator=torch.Generator().manual_seed(seed))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) parameters counted once


# ----------------------------------------------------------------------------------------------
# an n=1 model is an ordinary decoder of n_layers + head_layers blocks
# ----------------------------------------------------------------------------------------------

def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _plain_block(blk: Block, x, eps, theta):
    """One Llama block written out: RMSNorm, rotary (half-split) causal attention, SwiGLU."""
    Bsz, T, d = x.shape
    a = blk.attn
    hd = a.head_dim
    h = _rms(x, blk.attn_norm.weight, eps)
    q = (h @ a.q_proj.weight.T).view(Bsz, T, -1, hd)
    k = (h @ a.k_proj.weight.T).view(Bsz, T, -1, hd)
    v = (h @ a.v_proj.weight.T).view(Bsz, T, -1, hd)
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(T).float()[:, None] * inv_freq[None]  # [T, hd/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

    def rot(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), -1)

    q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2)
    v = v.transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(Bsz, T, -1)
    x = x + y @ a.o_proj.weight.T
    h = _rms(x, blk.mlp_norm.weight, eps)
    m = blk.mlp
    return x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T


@pytest.mark.parametrize("head_layers", [1, 2])
@pytest.mark.parametrize("tie", [False, True])
def test_ntp_model_is_a_plain_decoder(head_layers, tie):
    model = make_model(n_future=1, head_layers=head_layers, n_layers=3, tie_embeddings=tie)
    cfg = model.cfg
    tok = tokens_(length=12)
    blocks = list(model.trunk) + list(model.heads[0].blocks)
    assert len(blocks) == cfg.n_layers + head_layers
    assert isinstance(model.heads[0], TransformerHead)
    with torch.no_grad():
        logits = model(tok)
        assert len(logits) == 1 and logits[0].shape == (2, 12, VOCAB)
        # (a) a loop over the same blocks, with the model's own modules
        T = tok.shape[1]
        cos, sin = model.rope(torch.arange(T))
        x = model.tok_embeddings(tok)
        for blk in blocks:
            x = blk(x, cos, sin)
        loop = model.heads[0].norm(x) @ model.unembed.weight.T
        torch.testing.assert_close(logits[0], loop, rtol=1e-5, atol=1e-5)
        # (b) every operation written out by hand from the raw weights
        x = model.tok_embeddings.weight[tok]
        for blk in blocks:
            x = _plain_block(blk, x, cfg.norm_eps, cfg.rope_theta)
        plain = _rms(x, model.heads[0].norm.weight, cfg.norm_eps) @ model.unembed.weight.T
        torch.testing.assert_close(logits[0], plain, rtol=1e-4, atol=1e-5)
    if tie:
        assert model.unembed.weight is model.tok_embeddings.weight


def test_gqa_model_matches_plain_decoder_with_repeated_kv():
    model = make_model(n_future=1, n_kv_heads=2)
    tok = tokens_()
    with torch.no_grad():
        logits = model(tok)[0]
        x = model.tok_embeddings.weight[tok]
        for blk in list(model.trunk) + list(model.heads[0].blocks):
            x = _plain_block_gqa(blk, x, model.cfg)
        plain = _rms(x, model.heads[0].norm.weight, model.cfg.norm_eps) @ model.unembed.weight.T
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-5)


def _plain_block_gqa(blk, x, cfg):
    # expand k/v projections to one per query head, then reuse the plain block
    rep = cfg.n_heads // cfg.n_kv_heads
    hd = cfg.head_dim
    a = blk.attn
    k_w = a.k_proj.weight.view(cfg.n_kv_heads, hd, -1).repeat_interleave(rep, 0).reshape(-1, cfg.dim)
    v_w = a.v_proj.weight.view(cfg.n_kv_heads, hd, -1).repeat_interleave(rep, 0).reshape(-1, cfg.dim)
    full = Block(cfg.replace(n_kv_heads=cfg.n_heads), 0)
    full.load_state_dict({**blk.state_dict(), "attn.k_proj.weight": k_w, "attn.v_proj.weight": v_w})
    return _plain_block(full, x, cfg.norm_eps, cfg.rope_theta)


# ----------------------------------------------------------------------------------------------
# no leakage: head i at position t sees tokens <= t (transformer/linear) or <= t+i-1 (causal)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_no_future_leakage(head_type):
    n, T = 4, 10
    model = make_model(n_future=n, head_type=head_type)
    tok = tokens_(b=1, length=T + n - 1)  # causal heads embed up to token T-1 + n-1
    with torch.no_grad():
        base = model(tok, seq_len=T)
        for p in range(tok.shape[1]):
            pert = tok.clone()
            pert[0, p] = (pert[0, p] + 1 + p) % VOCAB
            out = model(pert, seq_len=T)
            for i in range(1, n + 1):
                # the last input token head i may see at position t
                lag = i - 1 if head_type == "causal" else 0
                blind = [t for t in range(T) if t + lag < p]  # positions that must not see token p
                sees = [t for t in range(T) if t + lag >= p]
                torch.testing.assert_close(out[i - 1][0, blind], base[i - 1][0, blind], rtol=0, atol=0)
                if sees:  # the test is sensitive: positions allowed to see token p do change
                    assert not torch.allclose(out[i - 1][0, sees], base[i - 1][0, sees])


def test_causal_heads_chain_and_embed_shifted_tokens():
    model = make_model(n_future=3, head_type="causal")
    assert model.heads_chain
    assert isinstance(model.heads[0], TransformerHead) and not isinstance(model.heads[0], CausalHead)
    assert all(isinstance(h, CausalHead) for h in model.heads[1:])
    assert all(isinstance(h, LinearHead) for h in make_model(3, "linear").heads)
    # without tokens beyond T, head i's last i-1 positions embed padding (no target there anyway)
    tok = tokens_(b=1, length=8)
    with torch.no_grad():
        short = model(tok[:, :6])
        long = model(tok, seq_len=6)
    for i in (1, 2, 3):
        torch.testing.assert_close(short[i - 1][:, : 6 - (i - 1)], long[i - 1][:, : 6 - (i - 1)], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# parameter counts
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_count_parameters_named_sizes_on_meta(size):
    # as configured (mtp_pretrain/conf/model/<size>.yaml), as the NTP baseline, and baseline-matched MTP
    for overrides in ({}, dict(n_future=1), dict(n_future=4, match_baseline_params=True),
                      dict(n_future=2, head_type="causal", tie_embeddings=True)):
        cfg = model_config(size, **overrides)
        with torch.device("meta"):
            model = MTPTransformer(cfg)
        assert all(p.is_meta for p in model.parameters())
        counts = count_parameters(cfg)
        built = n_params(model)
        print(f"\n{size} {overrides}: built {built:,} formula {counts['total']:,} "
              f"non-embedding {counts['non_embedding']:,}")
        assert built == counts["total"], overrides
        assert n_params(model.trunk) == counts["trunk"]
        assert n_params(model.heads) == counts["heads"]
        assert model.tok_embeddings.weight.numel() == counts["embedding"]
        assert counts["non_embedding"] == counts["trunk"] + counts["heads"]
        assert len(model.heads) == cfg.n_future
        if cfg.n_future == 1:  # one-block heads: the NTP model is n_layers + 1 blocks deep
            assert len(model.trunk) + sum(len(h.blocks) for h in model.heads) == cfg.n_layers + 1


def test_named_size_targets():
    # the sizes are named after the NTP (n_future=1) model
    tiny = count_parameters(model_config("tiny", n_future=1))
    small = count_parameters(model_config("small", n_future=1))
    assert abs(tiny["non_embedding"] / 1e6 - 1) <= 0.15, tiny
    assert abs(small["non_embedding"] / 10e6 - 1) <= 0.15, small
    # 124m is GPT-2-small-like: 12 blocks in the NTP model, 124M +- 15% with tied embeddings
    c124 = count_parameters(model_config("124m", n_future=1, tie_embeddings=True))
    assert abs(c124["total"] / 124e6 - 1) <= 0.15, c124
    c7 = count_parameters(model_config("7b", n_future=1))
    assert abs(c7["total"] / 6.74e9 - 1) <= 0.02, c7  # Llama-2 7B shape


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_count_parameters_variants(n, head_type, tie):
    kw = dict(n_future=n, head_type=head_type, tie_embeddings=tie, head_layers=2 if head_type != "linear" else 1,
              n_layers=9, n_kv_heads=2)
    variants = [kw]
    if head_type != "linear":
        variants.append({**kw, "match_baseline_params": True})
    for v in variants:
        cfg = ModelConfig(vocab_size=VOCAB, dim=32, n_heads=4, max_seq_len=16, **v)
        model = MTPTransformer(cfg)
        counts = count_parameters(cfg)
        assert n_params(model) == counts["total"], v
        assert n_params(model.heads) == counts["heads"], v
        assert n_params(model.trunk) == counts["trunk"], v
        assert len(model.heads) == n


@pytest.mark.parametrize("head_type", ["transformer", "causal"])
def test_match_baseline_params(head_type):
    d, n_layers, head_layers = 32, 7, 2
    kw = dict(vocab_size=VOCAB, dim=d, n_heads=4, n_layers=n_layers, head_layers=head_layers, head_type=head_type)
    ntp = MTPTransformer(ModelConfig(n_future=1, **kw))
    mtp = MTPTransformer(ModelConfig(n_future=4, match_baseline_params=True, **kw))
    blocks = lambda m: len(m.trunk) + sum(len(h.blocks) for h in m.heads)  # noqa: E731
    # the (n-1) * head_layers blocks of the extra heads come out of the trunk: same block count,
    # same embedding and unembedding, so the totals differ only by the extra heads' own non-block
    # parameters -- a final RMSNorm each (d), and for causal heads also the two input norms (2d)
    # and the 2d -> d fuse projection (2d^2).
    assert len(mtp.trunk) == n_layers - 3 * head_layers and blocks(mtp) == blocks(ntp) == n_layers + head_layers
    extra = d if head_type == "transformer" else d + 2 * d + 2 * d * d
    assert n_params(mtp) - n_params(ntp) == 3 * extra
    assert n_params(mtp) != n_params(ntp)  # i.e. "same parameters" holds for blocks, not exactly
    cm, cn = count_parameters(mtp.cfg), count_parameters(ntp.cfg)
    assert cm["total"] - cn["total"] == 3 * extra
    # the block parameters themselves are exactly matched
    block_params = lambda m: sum(n_params(b) for b in m.modules() if isinstance(b, Block))  # noqa: E731
    assert block_params(mtp) == block_params(ntp)


def test_match_baseline_params_with_named_size():
    # 7b with 4 heads: 31 - 3 = 28 trunk blocks + 4 head blocks = 32 = the NTP model's depth
    base = count_parameters(model_config("7b", n_future=1))
    mtp = count_parameters(model_config("7b", n_future=4, match_baseline_params=True))
    assert model_config("7b", n_future=4, match_baseline_params=True).trunk_layers == 28
    assert mtp["total"] - base["total"] == 3 * 4096
    assert mtp["total"] / base["total"] - 1 < 1e-5


# ----------------------------------------------------------------------------------------------
# configuration errors name the field
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, field", [
    (dict(n_future=0), "n_future"),
    (dict(n_future=-2), "n_future"),
    (dict(head_type="mlp"), "head_type"),
    (dict(dim=30, n_heads=4), "n_heads"),
    (dict(dim=0), "dim"),
    (dict(n_layers=0), "n_layers"),
    (dict(head_layers=0), "head_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(n_future=4, match_baseline_params=True, n_layers=3), "n_future"),
    (dict(n_future=3, match_baseline_params=True, n_layers=4, head_layers=2), "head_layers"),
    (dict(n_future=2, match_baseline_params=True, head_type="linear"), "match_baseline_params"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig(**{**dict(vocab_size=VOCAB, dim=32, n_heads=4, n_layers=4), **kw})


def test_heads_deeper_than_model_message():
    with pytest.raises(ValueError, match="heads deeper than the model allows") as e:
        ModelConfig(dim=32, n_heads=4, n_layers=3, n_future=4, match_baseline_params=True)
    assert "n_future" in str(e.value) and "head_layers" in str(e.value)
    # exactly enough layers is fine: one trunk block left
    assert ModelConfig(dim=32, n_heads=4, n_layers=4, n_future=4, match_baseline_params=True).trunk_layers == 1


def test_unknown_size():
    with pytest.raises(ValueError, match="model.name"):
        model_config("3b")


def test_sequence_longer_than_max_seq_len():
    model = make_model(n_future=2)  # max_seq_len 32
    with torch.no_grad():
        assert model(tokens_(length=32))[0].shape == (2, 32, VOCAB)  # exactly the limit is fine
        with pytest.raises(ValueError, match="max_seq_len"):
            model(tokens_(length=33))
        with pytest.raises(ValueError, match="max_seq_len"):
            model.trunk_forward(tokens_(length=4), positions=torch.arange(30, 34))


def test_check_vocab():
    cfg = ModelConfig(vocab_size=1000, dim=32, n_heads=4)
    check_vocab(cfg, 1000)
    check_vocab(cfg, 900)  # a padded model vocabulary is fine
    with pytest.raises(ValueError, match=r"model.vocab_size \(1000\) is smaller than the tokenizer's vocabulary \(1001\)"):
        check_vocab(cfg, 1001)
