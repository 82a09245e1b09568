"""Incremental decoding: KV cache, rollback, and the exactness of speculative decoding.

Everything runs in float32 on CPU with tiny models. Random models get a scaled-up unembedding
so that their logits are well separated: exactness is token-for-token equality of argmaxes, and
a near tie could flip under the (legitimately) different float summation orders of a k-token
pass and k one-token passes. The trained model learns a repetitive sequence so that its heads
agree and drafts really get accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from mtp_pretrain.inference import Decoder, DraftTree, GenerationConfig, KVCache, generate
from mtp_pretrain.inference.sampling import filtered_probs
from mtp_pretrain.inference.stacked_heads import StackedHeads
from mtp_pretrain.model import ModelConfig, MTPTransformer

HEAD_TYPES = ("transformer", "linear", "causal")
SPEC_MODES = ("self_speculative", "tree")


def random_model(head_type="transformer", n=4, vocab=64, seed=0, logit_scale=25.0, **kw) -> MTPTransformer:
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, n_future=n,
                      head_type=head_type, max_seq_len=128, **kw)
    model = MTPTransformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        model.unembed.weight.mul_(logit_scale)  # logit spread: no near ties (see module doc)
    return model.eval()


def ragged_prompts(n_prompts=8, vocab=64, seed=1, max_len=12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n_prompts,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


@torch.no_grad()
def full_recompute_greedy(model, prompt, max_new_tokens, eos_id=None) -> list[int]:
    """The definition of greedy decoding: re-run the whole sequence without a cache each step."""
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([seq]))[0][0, -1].argmax())
        out.append(token)
        seq.append(token)
        if token == eos_id:
            break
    return out


def run_batched(model, prompts, batch_size, **config) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), batch_size):
        out += generate(model, prompts[i: i + batch_size], **config).tokens
    return out


def eos_hit_mid_batch(reference: list[list[int]]) -> int:
    """An EOS id that stops the 3rd sequence within 6 tokens while some other sequence never
    produces it (so the batch has both early-stopped and full-length sequences)."""
    for token in reference[2][:6]:
        if any(token not in other for other in reference):
            return token
    raise AssertionError("no suitable EOS candidate; change the seed")


# -- KV cache decoding is plain greedy decoding ---------------------------------------------------


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_cached_greedy_equals_full_recompute(head_type):
    model = random_model(head_type)
    prompts = ragged_prompts()
    reference = [full_recompute_greedy(model, p, 16) for p in prompts]
    assert run_batched(model, prompts, 1, mode="greedy", max_new_tokens=16) == reference
    assert run_batched(model, prompts, 8, mode="greedy", max_new_tokens=16) == reference


# -- speculative modes are greedy, token for token --------------------------------------------------


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_speculative_equals_greedy_random_model(head_type):
    model = random_model(head_type)
    prompts = ragged_prompts()
    greedy = run_batched(model, prompts, 8, mode="greedy", max_new_tokens=20)
    eos = eos_hit_mid_batch(greedy)
    greedy_eos = run_batched(model, prompts, 8, mode="greedy", max_new_tokens=20, eos_id=eos)
    assert len(greedy_eos[2]) <= 6 and greedy_eos[2][-1] == eos
    assert any(len(o) == 20 for o in greedy_eos), "some sequences must run to max tokens"
    for mode in SPEC_MODES:
        if mode == "tree" and head_type == "causal":
            continue
        for bs in (1, 8):
            assert run_batched(model, prompts, bs, mode=mode, max_new_tokens=20) == greedy, (mode, bs)
            assert run_batched(model, prompts, bs, mode=mode, max_new_tokens=20, eos_id=eos) == greedy_eos


def test_tree_with_causal_heads_raises_clearly():
    model = random_model("causal")
    with pytest.raises(NotImplementedError, match="independent heads"):
        generate(model, [[1, 2]], mode="tree", max_new_tokens=4)


def train_repetitive(head_type: str, n: int, steps: int, seed: int = 0, vocab: int = 32, cycle_len: int = 20):
    """Train a tiny model on a repeated random cycle of tokens with 5% noise: the future is
    predictable, so heads 2..n learn it and their drafts get accepted."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_future=n, head_type=head_type,
                      max_seq_len=256, init_std=0.05)
    model = MTPTransformer(cfg)
    model.init_weights(seed)
    g = torch.Generator().manual_seed(seed)
    cycle = torch.randperm(vocab, generator=g)[:cycle_len]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    T = 32
    for _ in range(steps):
        idx = (torch.randint(0, cycle_len, (8, 1), generator=g) + torch.arange(T + n)) % cycle_len
        tokens = cycle[idx]
        noise = torch.rand(tokens.shape, generator=g) < 0.05
        tokens = torch.where(noise, torch.randint(0, vocab, tokens.shape, generator=g), tokens)
        logits = model(tokens, seq_len=T)
        loss = sum(F.cross_entropy(lg.reshape(-1, vocab), tokens[:, i + 1: i + 1 + T].reshape(-1))
                   for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cycle.tolist()


@pytest.fixture(scope="module")
def trained():
    return train_repetitive("transformer", n=4, steps=120)


def cycle_prompts(cycle) -> list[list[int]]:
    spans = [(0, 5), (3, 9), (7, 2), (1, 12), (5, 1), (10, 7), (2, 3), (4, 6)]
    prompts = [[cycle[(i + j) % len(cycle)] for j in range(length)] for i, length in spans]
    prompts[6] = [cycle[3], cycle[11], cycle[0], cycle[7]]  # off-cycle: heads disagree here
    return prompts


def test_trained_model_accepts_drafts_and_stays_exact(trained):
    model, cycle = trained
    prompts = cycle_prompts(cycle)
    greedy = run_batched(model, prompts, 8, mode="greedy", max_new_tokens=40)
    assert greedy == [full_recompute_greedy(model, p, 40) for p in prompts]
    for mode in SPEC_MODES:
        # All drafting heads every pass (auto's choice would depend on this machine's timings).
        results = {bs: [generate(model, prompts[i: i + bs], mode=mode, max_new_tokens=40, num_drafts=None)
                        for i in range(0, len(prompts), bs)] for bs in (1, 8)}
        for bs, runs in results.items():
            assert [t for r in runs for t in r.tokens] == greedy, (mode, bs)
        stats = results[8][0].stats
        assert stats.accepted_per_forward > 2.0, stats.to_dict()  # drafts really are accepted
        assert stats.forward_passes < 40
        rates = stats.acceptance_rate_per_position()
        assert len(rates) == 3 and rates[0] > 0.5


@pytest.mark.parametrize("head_type", ("transformer", "causal"))
def test_fewer_drafting_heads_stay_exact(trained, head_type):
    """num_drafts=k drafts with heads 2..k+1 only: still greedy, k acceptance positions, and a
    request for more drafting heads than the model has fails naming the count."""
    model, cycle = trained if head_type == "transformer" else train_repetitive("causal", n=4, steps=80, seed=1)
    prompts = cycle_prompts(cycle)
    greedy = generate(model, prompts, mode="greedy", max_new_tokens=30).tokens
    modes = SPEC_MODES if head_type == "transformer" else ("self_speculative",)
    for mode in modes:
        for k in (1, 2):
            res = generate(model, prompts, mode=mode, max_new_tokens=30, num_drafts=k)
            assert res.tokens == greedy, (mode, k)
            assert len(res.stats.acceptance_rate_per_position()) == k
            assert res.stats.accepted_per_forward <= k + 1
            if head_type == "causal":
                # drafting after the prompt pass and every pass but the last (nothing left to draft for)
                assert res.stats.head_passes == k * (res.stats.forward_passes - 1)
    with pytest.raises(ValueError, match="num_drafts=4.*3 drafting heads"):
        generate(model, prompts, mode="self_speculative", max_new_tokens=4, num_drafts=4)
    with pytest.raises(ValueError, match="num_drafts must be >= 1"):
        GenerationConfig(mode="self_speculative", num_drafts=0)


def test_trained_model_eos_mid_batch(trained):
    model, cycle = trained
    prompts = cycle_prompts(cycle)
    eos = cycle[15]  # every on-cycle sequence reaches it, each after a different number of tokens
    greedy = generate(model, prompts, mode="greedy", max_new_tokens=30, eos_id=eos)
    lengths = sorted({len(t) for t in greedy.tokens})
    assert len(lengths) > 2 and min(lengths) < 30
    reasons = {s.finish_reason for s in greedy.stats.sequences}
    assert "eos" in reasons
    for mode in SPEC_MODES:
        for bs in (1, 8):
            assert run_batched(model, prompts, bs, mode=mode, max_new_tokens=30, eos_id=eos) == greedy.tokens


def test_causal_heads_speculative_trained():
    model, cycle = train_repetitive("causal", n=3, steps=80, seed=1)
    prompts = cycle_prompts(cycle)
    greedy = generate(model, prompts, mode="greedy", max_new_tokens=24)
    spec = generate(model, prompts, mode="self_speculative", max_new_tokens=24, num_drafts=None)
    assert spec.tokens == greedy.tokens
    assert run_batched(model, prompts, 1, mode="self_speculative", max_new_tokens=24) == greedy.tokens
    assert spec.stats.accepted_per_forward > 1.5, spec.stats.to_dict()
    assert spec.stats.head_passes == 2 * (spec.stats.forward_passes - 1)  # heads 2, 3 draft in sequence


# -- adaptive draft length (num_drafts="auto") --------------------------------------------------------


class ShuffledCosts:
    """A cost model that makes every pass's choice a pseudo-random k (it only ranks k; the
    acceptance estimate cannot overrule a 100x cost gap): exercises every switch of draft
    length, heads that catch up after being skipped included."""

    def __init__(self, max_drafts: int, seed: int = 0):
        self.max_drafts, self.g = max_drafts, torch.Generator().manual_seed(seed)
        self.calls = 0

    def __call__(self, k: int, batch_size: int) -> float:
        if k == 0:
            self.calls += 1
            self.pick = int(torch.randint(0, self.max_drafts + 1, (1,), generator=self.g))
        return 1.0 if k == self.pick else 100.0


def assert_switches_both_ways(draft_lengths: list[int]) -> None:
    ups = sum(b > a for a, b in zip(draft_lengths, draft_lengths[1:]))
    downs = sum(b < a for a, b in zip(draft_lengths, draft_lengths[1:]))
    assert ups >= 2 and downs >= 2 and 0 in draft_lengths, draft_lengths


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_auto_draft_length_equals_greedy(head_type):
    """num_drafts='auto' (measured costs, and a schedule that switches k at random) is greedy
    token for token: batch 1 and 8, ragged prompts, EOS mid-batch."""
    model = random_model(head_type)
    prompts = ragged_prompts()
    greedy = run_batched(model, prompts, 8, mode="greedy", max_new_tokens=20)
    eos = eos_hit_mid_batch(greedy)
    greedy_eos = run_batched(model, prompts, 8, mode="greedy", max_new_tokens=20, eos_id=eos)
    assert any(len(o) < 20 for o in greedy_eos) and any(len(o) == 20 for o in greedy_eos)
    for costs in (None, ShuffledCosts(3)):
        decoder = Decoder(model, cost_model=costs)
        for bs in (1, 8):
            for eos_id, reference in ((None, greedy), (eos, greedy_eos)):
                config = GenerationConfig(mode="self_speculative", max_new_tokens=20, eos_id=eos_id)
                runs = [decoder.generate(prompts[i: i + bs], config) for i in range(0, len(prompts), bs)]
                assert [t for r in runs for t in r.tokens] == reference, (costs, bs, eos_id)
                lengths = [k for r in runs for k in r.stats.draft_lengths]
                assert len(lengths) == sum(r.stats.forward_passes - 1 for r in runs)
                assert set(lengths) <= {0, 1, 2, 3}
        if costs is not None:
            assert_switches_both_ways(runs[0].stats.draft_lengths)


def test_auto_trained_model_stays_exact(trained):
    model, cycle = trained
    prompts = cycle_prompts(cycle)
    greedy = generate(model, prompts, mode="greedy", max_new_tokens=40).tokens
    for costs in (None, ShuffledCosts(3, seed=1)):
        for bs in (1, 8):
            decoder = Decoder(model, cost_model=costs)
            config = GenerationConfig(mode="self_speculative", max_new_tokens=40)
            runs = [decoder.generate(prompts[i: i + bs], config) for i in range(0, len(prompts), bs)]
            assert [t for r in runs for t in r.tokens] == greedy, (costs, bs)
    assert runs[0].stats.accepted_per_forward > 1.5  # drafts are accepted across the switches
    assert_switches_both_ways(runs[0].stats.draft_lengths)


def test_forced_cost_model_gives_expected_draft_length(trained):
    """With pass costs forced by the hook, the decoder feeds the k that maximises expected
    tokens per cost: all heads when drafts are free, none when they cost 10 passes each, and
    one draft when head 3 is useless (its drafts are never accepted) and drafts cost 0.3 pass."""
    import copy

    model, cycle = trained
    prompts = cycle_prompts(cycle)
    config = GenerationConfig(mode="self_speculative", max_new_tokens=40)
    free = Decoder(model, cost_model=lambda k, b: 1.0).generate(prompts, config)
    assert set(free.stats.draft_lengths) == {3}
    dear = Decoder(model, cost_model=lambda k, b: 1.0 + 10 * k).generate(prompts, config)
    assert set(dear.stats.draft_lengths) == {0} and dear.stats.accepted_per_forward == 1.0
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.heads[2].norm.weight.zero_()  # head 3's logits all 0: it always drafts token 0
    assert 0 not in cycle
    res = Decoder(model, cost_model=lambda k, b: 1.0 + 0.3 * k).generate(prompts, config)
    # The first pass feeds all heads (nothing measured: acceptance 1 assumed); once head 3's
    # drafts are seen rejected, one draft per pass is best: (1 + c1) / 1.3 with c1 > 0.5.
    assert res.stats.draft_lengths[0] == 3 and set(res.stats.draft_lengths[1:]) == {1}, res.stats.draft_lengths
    assert res.tokens == generate(model, prompts, mode="greedy", max_new_tokens=40).tokens


class SimulatedClock:
    """A clock that advances by what a pass costs on a modelled compute-bound machine (in greedy
    passes: verifying k drafts 1 + 0.1k, drafting k tokens 0.4k, each head position a skipped
    head catches up 0.02, a prompt token 0.03), so that what ``auto`` decides from its timings,
    and what it gains, can be checked exactly: the real machine's timings are noise."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def decoder(self, model) -> Decoder:
        clock = self

        class SimulatedDecoder(Decoder):
            def _chain_step(self, st, cfg, gen):
                clock.now += 1 + 0.1 * st.drafts.shape[1]
                return super()._chain_step(st, cfg, gen)

            def _draft(self, st, k, width, cfg, gen):
                if k:
                    lag = (st.length - st.head_length[:, 2: k + 2].min(dim=1).values).clamp(min=1)
                    clock.now += 0.4 * k + 0.02 * k * float(lag.sum() - lag.numel())
                return super()._draft(st, k, width, cfg, gen)

            def _prefill(self, prompts, *args):
                clock.now += 0.03 * sum(map(len, prompts))
                return super()._prefill(prompts, *args)

        return SimulatedDecoder(model)


def simulated_speedups(monkeypatch, model, prompts, max_new_tokens=40) -> dict[str, float]:
    """Speedup over greedy on the simulated clock of greedy, fixed k = 1..n-1 and auto, the
    decoders taking turns prompt by prompt after one warm-up call; outputs checked equal."""
    import mtp_pretrain.inference.decode as decode_module

    clock = SimulatedClock()
    monkeypatch.setattr(decode_module, "time", clock)
    decoder = clock.decoder(model)
    configs = {"greedy": GenerationConfig(mode="greedy", max_new_tokens=max_new_tokens),
               "auto": GenerationConfig(mode="self_speculative", max_new_tokens=max_new_tokens)}
    for k in range(1, model.n_future):
        configs[f"fixed_{k}"] = GenerationConfig(mode="self_speculative", max_new_tokens=max_new_tokens, num_drafts=k)
    decoder.generate(prompts[:1], configs["auto"])
    seconds, outputs = dict.fromkeys(configs, 0.0), {m: [] for m in configs}
    for prompt in prompts:
        for mode, config in configs.items():
            res = decoder.generate([prompt], config)
            seconds[mode] += res.stats.wall_time_s
            outputs[mode] += res.tokens
    assert all(out == outputs["greedy"] for out in outputs.values())
    return {m: seconds["greedy"] / s for m, s in seconds.items()}


def test_auto_pays_only_where_drafts_pay_on_a_simulated_clock(monkeypatch, trained):
    """On a modelled machine where a pass of k drafts costs 1.5-2.2 greedy passes: where no
    draft is accepted (random heads) auto stays within 3 % of greedy decoding (its probes are
    paid from explore_share); where drafts are accepted (the repetitive model) it is within 0.05
    of the best fixed k."""
    never = simulated_speedups(monkeypatch, random_model(), ragged_prompts(24, seed=3))
    assert max(never[f"fixed_{k}"] for k in (1, 2, 3)) < 0.8, never  # speculation does not pay here
    assert never["auto"] >= 0.97, never
    model, cycle = trained
    prompts = cycle_prompts(cycle) * 2
    pays = simulated_speedups(monkeypatch, model, prompts)
    best = max(pays[f"fixed_{k}"] for k in (1, 2, 3))
    assert best > 1.3, pays
    assert pays["auto"] >= best - 0.05, pays


def test_draft_length_controller_decision():
    """The decision rule on hand-computed numbers: measured costs per batch size (with the
    rescaled fallback), decayed acceptance, warm-up order."""
    from mtp_pretrain.inference.adaptive import DraftLengthController

    ctl = DraftLengthController(3, acceptance_decay=1.0, prior_weight=1e-9, min_samples=1)
    assert ctl.choose(8) == 3  # warm-up: the largest k not timed yet
    # 10 sequences fed 3 drafts: accepted 0, 1, 2, 3 drafts by 4, 2, 2, 2 of them
    ctl.record_verification(3, 10, 0.0, [0] * 4 + [1] * 2 + [2] * 2 + [3] * 2)
    c = ctl.conditional_acceptance()
    assert c == pytest.approx([6 / 10, 4 / 6, 2 / 4])
    assert ctl.expected_tokens() == pytest.approx([1.0, 1.6, 2.0, 2.2])
    for k, (verify, draft) in enumerate([(1.0, 0.0), (1.2, 0.2), (1.5, 0.3), (1.8, 0.4)]):
        ctl.record_verification(k, 8, verify, [])
        ctl.record_drafting(k, 8, draft)
    # tokens per second: 1/1, 1.6/1.4, 2.0/1.8, 2.2/2.2 -> k = 1
    assert ctl.costs(8) == pytest.approx([1.0, 1.4, 1.8, 2.2])
    assert ctl.choose(8) == 1
    # Batch 4 has only k = 0 timed, at half the batch-8 time: the others are rescaled by 1/2.
    ctl.record_verification(0, 4, 0.5, [])
    ctl.record_drafting(0, 4, 0.0)
    assert ctl.costs(4) == pytest.approx([0.5, 0.7, 0.9, 1.1])
    # A preempted pass (10x slower) does not move the lower quartile of the last samples.
    for seconds in (1.2, 12.0, 1.2, 1.2):
        ctl.record_verification(1, 8, seconds, [])
    assert ctl.costs(8)[1] == pytest.approx(1.4) and ctl.choose(8) == 1
    # Every other k is stale after refresh_interval passes, and decoding earned allowance: they
    # are timed again, the nearest to the one in use first (the longer of two), one at a time.
    for _ in range(ctl.refresh_interval):
        ctl.record_verification(1, 8, 1.2, [])
        ctl.record_drafting(1, 8, 0.2)
    assert ctl.choose(8) == 2
    ctl.record_verification(2, 8, 1.5, [])
    assert ctl.choose(8) == 2  # its drafting not timed again yet (a switch to a longer draft catches up)
    ctl.record_drafting(2, 8, 0.3)
    assert ctl.choose(8) == 0
    ctl.record_verification(0, 8, 1.0, [])
    ctl.record_drafting(0, 8, 0.0)
    assert ctl.choose(8) == 3
    ctl.record_verification(3, 8, 1.8, [])
    ctl.record_drafting(3, 8, 0.4)
    assert ctl.choose(8) == 1  # all timed again: back to the best
    # Free drafting heads but slow verification of 3 drafts: k = 2 (2.0/1.5 > 2.2/1.8 > 1.6/1.2)
    forced = DraftLengthController(3, cost_model=lambda k, b: [1.0, 1.2, 1.5, 1.8][k], acceptance_decay=1.0,
                                   prior_weight=1e-9)
    forced.record_verification(3, 10, 0.0, [0] * 4 + [1] * 2 + [2] * 2 + [3] * 2)
    assert forced.choose(1) == 2


def test_probes_are_paid_from_an_allowance():
    """A longer draft than the decision's is fed only as a probe: when what was seen at its
    position has faded (passes since it was last fed), and when the allowance earned by decoding
    (explore_share of its seconds) covers what the probe may lose, catch-up of skipped heads
    included. The probe is then charged its regret; one that wins costs nothing."""
    from mtp_pretrain.inference.adaptive import DraftLengthController

    def warmed(**kw):
        ctl = DraftLengthController(1, acceptance_decay=0.8, min_samples=1, **kw)
        for k, drafting in ((1, 0.7), (0, 0.0)):  # warm-up, the longest untimed first; a draft costs 0.7 pass
            assert ctl.choose(1) == k
            ctl.record_drafting(k, 1, drafting)
            ctl.record_verification(k, 1, 1.0, [0])  # the draft is rejected
        return ctl

    ctl = warmed(explore_share=0.02)
    allowance = ctl._measured["allowance"]
    assert allowance == pytest.approx(0.02 * 2.7)  # the warm-up is not charged
    passes = 0
    while ctl.choose(1) == 0:  # greedy passes earn allowance; the rejection fades
        ctl.record_drafting(0, 1, 0.0)
        ctl.record_verification(0, 1, 1.0, [])
        passes += 1
        assert passes < 1000
    # The probe waited until the allowance covered its 0.7 s of extra cost: 0.02 s per 1 s pass.
    assert passes >= (0.7 - allowance) / 0.02 - 1, passes
    before = ctl._measured["allowance"]
    ctl.record_drafting(1, 1, 0.7)
    ctl.record_verification(1, 1, 1.0, [0])  # lost: 1.7 s for one token
    assert ctl._measured["allowance"] == pytest.approx(before + 0.02 * 1.7 - 0.7)
    # A probe that wins (the draft accepted: 2 tokens for 1.7 s) is not charged.
    ctl = warmed(explore_share=0.02)
    while ctl.choose(1) == 0:
        ctl.record_drafting(0, 1, 0.0)
        ctl.record_verification(0, 1, 1.0, [])
    before = ctl._measured["allowance"]
    ctl.record_drafting(1, 1, 0.7)
    ctl.record_verification(1, 1, 1.0, [1])
    assert ctl._measured["allowance"] == pytest.approx(before + 0.02 * 1.7)
    # Waking a head that must first catch up 1000 positions (at the measured 0.01 s each) costs
    # more than the 20 tokens left could win back even if every draft were accepted: never probed.
    ctl = warmed(explore_share=0.02)
    ctl.record_drafting(1, 1, 10.0, catch_up=1000)
    for _ in range(2000):
        assert ctl.choose(1, [0], [20], catch_up=[0, 1000]) == 0
        ctl.record_drafting(0, 1, 0.0)
        ctl.record_verification(0, 1, 1.0, [], rows=[0])
    # ... while 100 positions are worth probing for once the allowance covers the risk.
    assert any(ctl.choose(1, [0], [20], catch_up=[0, 100]) == 1 for _ in range(1))
    # No allowance (explore_share=0): never probed either; the decision alone stays greedy.
    ctl = warmed(explore_share=0.0)
    for _ in range(2000):
        assert ctl.choose(1) == 0
        ctl.record_drafting(0, 1, 0.0)
        ctl.record_verification(0, 1, 1.0, [])


def test_acceptance_memory_outlives_greedy_batches():
    """A position's prior is the acceptance of the last batches that fed it, however many
    batches fed nothing since: a run of greedy batches must not reset it to the optimistic
    c_{j-1} = 1 (the next batch would then start by feeding every head, and paying for their
    catch-up over its prompt)."""
    from mtp_pretrain.inference.adaptive import DraftLengthController

    costs = lambda k, b: [1.0, 1.3, 1.6][k]  # noqa: E731
    ctl = DraftLengthController(2, cost_model=costs)
    for _ in range(20):  # drafts never accepted
        ctl.record_verification(2, 1, 0.0, [0], rows=[0])
    history = ctl.passed_on()
    for batch in range(6):  # greedy batches after it
        ctl = DraftLengthController(2, cost_model=costs, history=history)
        assert ctl.acceptance_prior[0] == pytest.approx(0.0), batch
        assert ctl.choose(1, [0], [50]) == 0, (batch, ctl.conditional_acceptance())
        ctl.record_verification(0, 1, 0.0, [0], rows=[0])
        history = ctl.passed_on()
    assert [len(seen) for seen in history] == [1, 0]  # position 2 was never reached: no count


def test_a_greedy_decision_holds_for_a_few_passes():
    """After a measured decision for a greedy pass the decoder skips deciding again (it observes
    no acceptance) for ``hold_passes`` passes, unless the batch shrinks; never with drafts fed."""
    from mtp_pretrain.inference.adaptive import DraftLengthController

    ctl = DraftLengthController(1, min_samples=1, hold_passes=3, explore_share=0.0)
    for k in (1, 0):  # warm-up
        assert ctl.held(1) is None and ctl.choose(1) == k
        ctl.record_drafting(k, 1, 0.7 * k)
        ctl.record_verification(k, 1, 1.0, [0])
    assert ctl.held(1) is None and ctl.choose(1) == 0
    held = []
    for _ in range(7):
        ctl.record_drafting(0, 1, 0.0)
        ctl.record_verification(0, 1, 1.0, [])
        k = ctl.held(1)
        held.append(k)
        if k is None:
            assert ctl.choose(1) == 0
    assert held == [0, 0, None, 0, 0, None, 0]
    assert ctl.held(2) is None  # a smaller or larger batch: decided again


def test_batch_draft_length_minimises_time_to_finish():
    """In a batch, k minimises pass cost x passes the slowest sequence still needs: long drafts
    while the sequence that rejects them has little left, none while it has much left."""
    from mtp_pretrain.inference.adaptive import DraftLengthController

    ctl = DraftLengthController(2, cost_model=lambda k, b: [1.0, 1.4, 1.9][k], acceptance_decay=1.0,
                                prior_weight=1e-9)
    for _ in range(10):  # sequence 0 accepts both drafts, sequence 1 none
        ctl.record_verification(2, 2, 0.0, [2, 0], rows=[0, 1])
    assert ctl.conditional_acceptance() == pytest.approx([0.5, 1.0])
    # per sequence, shrunk to the batch by 4 pseudo-passes: c = (10 + 4 * 0.5) / 14, 1 and 2 / 14, 1
    assert ctl.expected_tokens(0) == pytest.approx([1.0, 1 + 12 / 14, 1 + 24 / 14])
    assert ctl.expected_tokens(1) == pytest.approx([1.0, 1 + 2 / 14, 1 + 4 / 14])
    assert ctl.choose(2) == 1  # the typical sequence: 1.5 / 1.4 > 2.0 / 1.9 > 1 / 1
    # time to finish: k=0: 10; k=1: 1.4 * 10 / (16 / 14) = 12.3; k=2: 1.9 * 10 / (18 / 14) = 14.8
    assert ctl.choose(2, [0, 1], [10, 10]) == 0
    # sequence 1 needs 1 more token: k=0: 10; k=1: 1.4 * 10 / (26 / 14) = 7.5; k=2: 1.9 * 10 / (38 / 14) = 7.0
    assert ctl.choose(2, [0, 1], [10, 1]) == 2


# -- the heads' caches: drafts are exactly what a full forward would propose ------------------------


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_drafts_equal_full_forward_drafts(head_type):
    """After every step, the drafts of heads 2..k+1 at the last accepted position equal those of
    an uncached forward of the accepted sequence: the heads' own caches hold exactly the accepted
    positions (for causal heads: computed with the accepted tokens, not stale drafts). Fixed
    k = n-1, and an auto schedule switching k at random (heads skipped by short drafts catch up)."""
    model = random_model(head_type, n=4, logit_scale=40.0)
    checked = []

    class CheckingDecoder(Decoder):
        def _draft(self, st, k, width, cfg, gen):
            passes = super()._draft(st, k, width, cfg, gen)
            assert st.drafts.shape == (st.rows.numel(), k)
            for b in range(st.rows.numel() if k else 0):
                L = int(st.length[b])
                seq = st.tokens[b, :L].tolist() + [int(st.next_token[b])] + st.drafts[b, :-1].tolist()
                logits = model(torch.tensor([seq]), seq_len=L)
                expected = [int(logits[i][0, L - 1].argmax()) for i in range(1, k + 1)]
                assert st.drafts[b].tolist() == expected
                checked.append(k)
            return passes

    prompts = ragged_prompts(4)
    for costs, num_drafts in ((None, None), (ShuffledCosts(3, seed=2), "auto")):
        config = GenerationConfig(mode="self_speculative", max_new_tokens=12, num_drafts=num_drafts)
        checked.clear()
        out = CheckingDecoder(model, cost_model=costs).generate(prompts, config)
        assert out.tokens == [full_recompute_greedy(model, p, 12) for p in prompts]
        assert len(checked) >= 4 * 3
        if costs is not None:
            assert_switches_both_ways(out.stats.draft_lengths)
        # Sequences stopping at EOS leave the batch (and the caches, stacked heads' copies
        # included): the remaining ones still draft from exactly their own positions.
        eos = eos_hit_mid_batch(out.tokens)
        checked.clear()
        config = GenerationConfig(mode="self_speculative", max_new_tokens=12, eos_id=eos, num_drafts=num_drafts)
        out = CheckingDecoder(model, cost_model=costs).generate(prompts, config)
        assert out.tokens == [full_recompute_greedy(model, p, 12, eos) for p in prompts]
        assert min(map(len, out.tokens)) < 12 and max(map(len, out.tokens)) == 12
        assert len(checked) >= 4 * 3


@pytest.mark.parametrize("head_type", ("transformer", "linear"))
def test_stacked_heads_equal_heads_one_by_one(head_type):
    model = random_model(head_type, n=4)
    z = torch.randn(2, 5, model.cfg.dim)
    positions = torch.arange(5).expand(2, 5)
    cos, sin = model.rope(positions)
    states, normed = StackedHeads(model.heads[1:], first_layer_id=100)(z, cos, sin)
    assert states.shape == normed.shape == (3, 2, 5, model.cfg.dim)
    for k, i in enumerate((2, 3, 4)):
        state, norm = model.head_forward(i, z, None, positions)
        torch.testing.assert_close(states[k], state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normed[k], norm, atol=1e-5, rtol=1e-5)


def test_decoder_restacks_heads_after_weight_update(trained):
    """The stacked copy of the drafting heads follows in-place updates of the model's heads."""
    import copy

    model, cycle = trained
    model = copy.deepcopy(model)
    decoder = Decoder(model)
    prompts = cycle_prompts(cycle)
    config = GenerationConfig(mode="self_speculative", max_new_tokens=20, num_drafts=None)
    before = decoder.generate(prompts, config).stats.acceptance_rate_per_position()
    with torch.no_grad():
        model.heads[1].norm.weight.zero_()  # head 2's logits all 0: it always drafts token 0
    after = decoder.generate(prompts, config)
    fresh = Decoder(model).generate(prompts, config)
    assert [s.drafts_accepted for s in after.stats.sequences] == [s.drafts_accepted for s in fresh.stats.sequences]
    assert before[0] > 0.5 and after.stats.acceptance_rate_per_position()[0] < 0.2, (before, after.stats)


# -- rollback ---------------------------------------------------------------------------------------


def cache_equal_upto(a: KVCache, b: KVCache, n_slots: int, atol=1e-5) -> None:
    assert a.layer_ids() == b.layer_ids()
    for lid in a.layer_ids():
        torch.testing.assert_close(a.keys[lid][:, :, :n_slots], b.keys[lid][:, :, :n_slots], atol=atol, rtol=0)
        torch.testing.assert_close(a.values[lid][:, :, :n_slots], b.values[lid][:, :, :n_slots], atol=atol, rtol=0)


def sequence_rows(buf: torch.Tensor, batch_size: int, b: int) -> torch.Tensor:
    """Sequence b's rows of a cache buffer: one row, or one per copy in a head-stacked layer."""
    return buf.view(-1, batch_size, *buf.shape[1:])[:, b]


def test_chain_rollback_leaves_no_trace():
    """Feed 4 speculative tokens, keep 2, continue: cache and next logits are those of a run that
    only ever fed the 2 accepted tokens (and of a full forward); nothing was copied."""
    model = random_model("transformer", n=4)
    dec = Decoder(model)
    heads = [1, 2, 3, 4]
    prompts = [[5, 9, 2, 7, 1], [3, 8]]  # ragged: per-sequence lengths and rollback points
    P = torch.tensor([5, 2])
    padded = torch.tensor([[5, 9, 2, 7, 1], [3, 8, 0, 0, 0]])
    fed = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    keep = torch.tensor([2, 3])  # sequence 0 keeps 2 of 4, sequence 1 keeps 3
    nxt = torch.tensor([[30], [31]])

    spec = KVCache(2, 32)
    dec.forward_step(padded, torch.zeros(2, dtype=torch.long), heads, cache=spec)
    dec.forward_step(fed, P, heads, cache=spec)
    after_spec = dec.forward_step(nxt, P + keep, heads, cache=spec)  # rollback = the new start

    plain = KVCache(2, 32)
    dec.forward_step(padded, torch.zeros(2, dtype=torch.long), heads, cache=plain)
    for b in range(2):  # each sequence alone, fed only what it accepted
        one = KVCache(1, 32)
        dec.forward_step(torch.tensor([prompts[b]]), torch.zeros(1, dtype=torch.long), heads, cache=one)
        dec.forward_step(fed[b: b + 1, : keep[b]], P[b: b + 1], heads, cache=one)
        ref = dec.forward_step(nxt[b: b + 1], P[b: b + 1] + keep[b], heads, cache=one)
        n_slots = int(P[b] + keep[b] + 1)
        assert len(one.layer_ids()) == model.cfg.trunk_layers + 2 * model.cfg.head_layers  # + head 1, stacked 2-4
        for lid in one.layer_ids():
            for mine, alone in ((spec.keys[lid], one.keys[lid]), (spec.values[lid], one.values[lid])):
                torch.testing.assert_close(sequence_rows(mine, 2, b)[..., :n_slots, :], alone[..., :n_slots, :],
                                           atol=1e-5, rtol=0)
        full = model(torch.tensor([prompts[b] + fed[b, : keep[b]].tolist() + nxt[b].tolist()]))
        for i in heads:
            got = model.unembed(after_spec[i][1][b, -1])
            torch.testing.assert_close(got, model.unembed(ref[i][1][0, -1]), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(got, full[i - 1][0, -1], atol=1e-4, rtol=1e-5)
            assert int(got.argmax()) == int(full[i - 1][0, -1].argmax())


def test_tree_pass_and_path_packing():
    """A tree pass gives each node the outputs of its own branch fed as a chain; packing the
    accepted path leaves the cache as if only that branch had been fed."""
    model = random_model("transformer", n=3)
    dec = Decoder(model)
    heads = [1, 2, 3]
    tree = DraftTree([2, 2])  # root; depth 1: nodes 1, 2; depth 2: 3, 4 (under 1), 5, 6 (under 2)
    assert tree.parent.tolist() == [-1, 0, 0, 1, 1, 2, 2]
    prompt = torch.tensor([[4, 8, 15, 16]])
    P = torch.tensor([4])
    nodes = torch.tensor([[40, 41, 42, 43, 44, 45, 46]])

    tree_cache = KVCache(1, 32)
    dec.forward_step(prompt, torch.zeros(1, dtype=torch.long), heads, cache=tree_cache)
    tree_out = dec.forward_step(nodes, P, heads, tree.depth, tree.mask, cache=tree_cache)
    path = [0, 2, 6]
    tree_cache.move(P[:, None] + torch.tensor([[2, 6]]), P[:, None] + torch.tensor([[1, 2]]))
    after_tree = dec.forward_step(torch.tensor([[50]]), P + 3, heads, cache=tree_cache)

    chain_cache = KVCache(1, 32)
    dec.forward_step(prompt, torch.zeros(1, dtype=torch.long), heads, cache=chain_cache)
    chain_out = dec.forward_step(nodes[:, path], P, heads, cache=chain_cache)
    after_chain = dec.forward_step(torch.tensor([[50]]), P + 3, heads, cache=chain_cache)

    for i in heads:
        torch.testing.assert_close(tree_out[i][1][:, path], chain_out[i][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(after_tree[i][1], after_chain[i][1], atol=1e-5, rtol=0)
    cache_equal_upto(tree_cache, chain_cache, 4 + 3 + 1)


def test_cache_mask_and_capacity_checks():
    cache = KVCache(2, 8)
    cache.prepare(torch.tensor([2, 0]), 3)
    m = cache._mask[:, 0]
    assert m.shape == (2, 3, 5)
    assert m[0].tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                             [True, True, True, True, True]]
    assert m[1, 0].tolist() == [True, False, False, False, False]
    with pytest.raises(ValueError, match="overflow"):
        cache.prepare(torch.tensor([6, 0]), 3)
    with pytest.raises(ValueError, match="itself"):
        cache.prepare(torch.tensor([0, 0]), 2, torch.zeros(2, 2, dtype=torch.bool))


# -- sampling -----------------------------------------------------------------------------------


def test_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(filtered_probs(logits, 1.0, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(filtered_probs(logits, 1.0, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(filtered_probs(logits, 1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic, pooling cells of expected count < 5; returns (statistic, dof)."""
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("head_type", ("transformer", "causal"))
@torch.no_grad()
def test_speculative_sampling_is_exact_in_distribution(head_type):
    """The joint law of the first two sampled tokens and the law of the third, under
    speculative sampling, match the model's (temperature 0.8, top-p 0.95) distribution, computed
    exactly by enumeration; plain sampling is checked the same way. Drafts are far from the
    verifier (random heads), so rejections and residual draws really happen."""
    V, N, temp, top_p = 8, 6000, 0.8, 0.95
    model = random_model(head_type, n=3, vocab=V, logit_scale=8.0, seed=3)
    prompt = [1, 5, 2]
    p1 = filtered_probs(model(torch.tensor([prompt]))[0][0, -1], temp, top_p)  # [V]
    pairs = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
    out = model(pairs)[0]
    p2 = filtered_probs(out[:, -2], temp, top_p).view(V, V, V)[:, 0]  # p(x2 | x1): same for every b
    joint12 = (p1[:, None] * p2).flatten()  # [V*V]
    p3 = (joint12[:, None] * filtered_probs(out[:, -1], temp, top_p)).sum(0)  # p(x3)
    # Head 2's law of x2 (for causal heads, given x1 = head 1's argmax): far from the model's,
    # so accepting drafts blindly would be visibly wrong.
    x1 = int(p1.argmax())
    draft2 = filtered_probs(model(torch.tensor([prompt + [x1]]), seq_len=len(prompt))[1][0, -1], temp, top_p)
    assert 0.5 * float((p2[x1] - draft2).abs().sum()) > 0.1

    for mode in ("sample", "self_speculative"):
        res = generate(model, [prompt] * N, mode=mode, max_new_tokens=3, temperature=temp, top_p=top_p, seed=7,
                       **({} if mode == "sample" else {"num_drafts": None}))  # drafts every pass
        toks = torch.tensor(res.tokens)
        assert toks.shape == (N, 3)
        c12 = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V).float()
        c3 = torch.bincount(toks[:, 2], minlength=V).float()
        for counts, probs in ((c12, joint12), (c3, p3)):
            stat, dof = chi_square(counts, probs)
            # mean dof, sd sqrt(2 dof): 6 sd is a false-alarm rate far below 1e-6
            assert stat < dof + 6 * math.sqrt(2 * dof), (mode, stat, dof)
        if mode == "self_speculative":
            assert res.stats.sequence_forward_passes < 2.9 * N  # drafts accepted: fewer passes than tokens
            assert 0 < res.stats.acceptance_rate_per_position()[0] < 1


def test_sampling_rejected_for_tree_and_greedy():
    with pytest.raises(ValueError):
        GenerationConfig(mode="tree", temperature=1.0)
    with pytest.raises(ValueError):
        GenerationConfig(mode="sample", temperature=0.0)


# -- statistics and CLI -------------------------------------------------------------------------


def test_statistics_are_consistent():
    model = random_model("transformer", n=3)
    prompts = ragged_prompts(3)
    res = generate(model, prompts, mode="self_speculative", max_new_tokens=10)
    d = res.stats.to_dict()
    assert d["tokens_generated"] == 30 and d["batch_size"] == 3
    for s in res.stats.sequences:
        assert s.tokens_generated == 10 and s.finish_reason == "length"
        assert 1.0 <= s.accepted_per_forward <= 3.0
        # tokens = 1 (prompt pass) + sum over steps of (accepted drafts + 1), capped at max
        assert s.tokens_generated <= 1 + (s.forward_passes - 1) + sum(s.drafts_accepted)
    greedy = generate(model, prompts, mode="greedy", max_new_tokens=10).stats
    assert greedy.forward_passes == 10 and greedy.accepted_per_forward == 1.0
    json.dumps(d)


def write_export(tmp_path, model):
    """The single-file export layout (mtp_pretrain.export): weights, config, tokenizer."""
    from safetensors.torch import save_file

    from mtp_pretrain.data import ByteTokenizer

    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model": asdict(model.cfg)}))
    ByteTokenizer().save(out / "tokenizer.json")
    return out


def test_cli_json(tmp_path, capsys):
    from mtp_pretrain.data import ByteTokenizer
    from mtp_pretrain.inference import cli

    model = random_model("transformer", n=3, vocab=259, logit_scale=25.0)
    path = write_export(tmp_path, model)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("hello\nab\nx = 1\n")
    cli.main([str(path), "--prompts-file", str(prompts_file), "--prompt", "zzz", "--mode", "self_speculative",
              "--max-new-tokens", "6", "--batch-size", "3", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["prompt"] for r in lines] == ["hello", "ab", "x = 1", "zzz"]
    tok = ByteTokenizer()
    expected = run_batched(model, [tok.encode(p) for p in ["hello", "ab", "x = 1", "zzz"]], 1,
                           mode="greedy", max_new_tokens=6, eos_id=tok.eos_id)
    assert [r["token_ids"] for r in lines] == expected
    for r in lines:
        assert r["text"] == tok.decode(r["token_ids"])
        assert r["stats"]["tokens_generated"] == len(r["token_ids"])
        assert r["run"]["mode"] == "self_speculative"
        assert len(r["run"]["draft_lengths"]) == r["run"]["forward_passes"] - 1  # auto: k fed per pass
    with pytest.raises(SystemExit):
        cli.parse_args([str(path), "--num-drafts", "some"])
    assert cli.parse_args([str(path), "--num-drafts", "2"]).num_drafts == 2

    cli.main([str(path), "--prompt", "hi", "--max-new-tokens", "3"])
    text = capsys.readouterr().out
    assert "hi" in text and "accepted_per_forward" in text


def test_decode_speed_bench_runs(tmp_path, capsys):
    """bench/decode_speed.py end to end on a random tiny model and a prompts file of ids: its
    last line is the JSON summary with the keys the docs name, and speculative output is exact."""
    from bench import decode_speed as bench

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"ids": p}) for p in ([[1, 2, 3], [7] * 9, [4, 5]])))
    bench.main(["--random-init", "--prompts", str(prompts), "--max-new-tokens", "6", "--batch-sizes", "1", "2",
                "--repeats", "1", "--num-drafts", "2", "--data-dir", str(tmp_path / "none")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["exact"] and summary["num_drafts"] == 2
    assert set(summary["pass_breakdown_us"]) == {"greedy", "chain_2_drafts"}
    for bs in ("1", "2"):
        entry = summary["results"]["prompts"][bs]
        assert entry["exact"] and entry["accepted_per_forward"] >= 1.0
        for key in ("speedup_self_speculative", "speedup_tree", "speedup_auto", "pass_cost_self_speculative"):
            assert entry[key] > 0
        assert set(entry["speedup_fixed"]) == {"1", "2", "3"} and entry["best_fixed_k"] in (1, 2, 3)
        assert entry["speedup_self_speculative"] == entry["speedup_fixed"]["2"]
        assert sum(entry["auto_draft_lengths"].values()) > 0
        assert len(entry["acceptance_rate_per_position"]["self_speculative"]) == 2
        assert len(entry["acceptance_rate_per_position"]["auto"]) == 3
    assert summary["min_speedup_auto"] == min(summary["results"]["prompts"][bs]["speedup_auto"] for bs in ("1", "2"))


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_checkpoint_decodes_on_one_process(tmp_path, capsys):
    """A checkpoint written by pure ``tp`` on 2 ranks (DTensor shards of every projection and of
    the unembedding) loads into the single-process decoder: its weights are those of the same
    training on one process, and cached greedy, auto and mtp-generate decode it exactly."""
    from pathlib import Path

    from conftest import launch_worker
    from mtp_pretrain.data.synthetic import write_random_dataset
    from mtp_pretrain.checkpoint_reader import load_model
    from mtp_pretrain.inference import cli

    data = tmp_path / "data"
    write_random_dataset(data, {"train": 50_000, "val": 5_000}, seed=0)
    base = [f"data.sources=[{{path:{data},weight:1.0}}]", "data.seq_len=32", "data.prefetch=0", "model=tiny",
            "model.vocab_size=512", "model.dim=64", "model.n_future=3", "train.micro_batch_size=4",
            "train.global_batch_tokens=256", "train.max_steps=3", "train.dtype=float32", "train.device=cpu",
            "train.resume=never", "optim.lr=1e-3", "optim.warmup_steps=1", "checkpoint.interval=0"]
    tp = launch_worker(tmp_path / "tp", 2, [{"name": "tp", "overrides": base + ["parallel=tp"]}])["tp"]
    one = launch_worker(tmp_path / "one", 1, [{"name": "one", "overrides": base}])["one"]
    model, _ = load_model(Path(tp["dir"]) / "checkpoints")
    reference, _ = load_model(Path(one["dir"]) / "checkpoints")
    params, ref_params = model.state_dict(), reference.state_dict()
    assert params.keys() == ref_params.keys()
    for name in params:
        torch.testing.assert_close(params[name], ref_params[name], atol=1e-4, rtol=0, msg=name)
    prompts = ragged_prompts(4, vocab=512, seed=3)
    greedy = generate(model, prompts, mode="greedy", max_new_tokens=8).tokens
    assert greedy == [full_recompute_greedy(model, p, 8) for p in prompts]
    assert generate(model, prompts, mode="self_speculative", max_new_tokens=8).tokens == greedy
    model, tokenizer = load_model(Path(tp["dir"]) / "checkpoints")  # the tokenizer of the training data
    cli.main([str(Path(tp["dir"]) / "checkpoints"), "--prompt", "def f(x):", "--mode", "self_speculative",
              "--max-new-tokens", "8", "--no-eos", "--json"])
    expected = generate(model, [tokenizer.encode("def f(x):")], mode="greedy", max_new_tokens=8).tokens[0]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == expected
