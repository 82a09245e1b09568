"""Per-head evaluation against a hand computation, the model adapters (greedy decoding with and
without the KV cache), ``mtp-eval`` on every task with a tiny random checkpoint, and
finetuning an n=4 checkpoint into an n=1 model through the trainer (exact weights)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import run_inprocess
from safetensors.torch import load_file, save_file

from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.data.tokenizer import BPETokenizer
from mtp_pretrain.eval import cli, induction
from mtp_pretrain.eval.adapters import (full_recompute_greedy, generate_ids,
                                        make_batch_logits, make_generate)
from mtp_pretrain.eval.per_head import evaluate_per_head, per_head_sums
from mtp_pretrain.checkpoint_reader import load_model
from mtp_pretrain.export import export_single_file
from mtp_pretrain.loss import evaluate_loss
from mtp_pretrain.model import MTPTransformer
from mtp_pretrain.model.config import ModelConfig

VOCAB = 320


def tiny_model(n_future=3, head_type="transformer", vocab=VOCAB, max_seq_len=128, seed=0) -> MTPTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_future=n_future, head_type=head_type,
                      max_seq_len=max_seq_len)
    return MTPTransformer(cfg).float().eval()


@torch.no_grad()
def hand_per_head(model: MTPTransformer, tokens: torch.Tensor, seq_len: int, pad_id=None):
    """Loss sums, correct counts and counts per head, written out from the full logits."""
    logits = model(tokens, seq_len=seq_len)  # per head [B, T, V]
    sums, correct, counts = [], [], []
    for i, lg in enumerate(logits, start=1):
        ce = c = k = 0.0
        for b in range(tokens.shape[0]):
            for t in range(seq_len):
                if t + i >= tokens.shape[1]:
                    continue
                target = int(tokens[b, t + i])
                if pad_id is not None and target == pad_id:
                    continue
                logp = torch.log_softmax(lg[b, t].double(), -1)
                ce -= float(logp[target])
                c += float(int(lg[b, t].argmax()) == target)
                k += 1
        sums.append(ce), correct.append(c), counts.append(k)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(correct), torch.tensor(counts)


# ----------------------------------------------------------------------------------------------
# per-head evaluation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("head_type", ["transformer", "causal"])
def test_per_head_sums_equal_hand_computation(head_type):
    model = tiny_model(3, head_type)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    tokens[0, 7] = tokens[1, 3] = 256  # padding targets are skipped
    for seq_len in (9, 11):  # 9: every head has all its targets; 11: heads 2, 3 run out
        ce, correct, count = per_head_sums(model, tokens, seq_len=seq_len, pad_id=256)
        h_ce, h_correct, h_count = hand_per_head(model, tokens, seq_len, pad_id=256)
        torch.testing.assert_close(ce, h_ce, rtol=1e-5, atol=1e-4)
        assert correct.tolist() == h_correct.tolist() and count.tolist() == h_count.tolist()
        sums, counts = evaluate_loss(model, tokens, seq_len=seq_len, pad_id=256)
        torch.testing.assert_close(ce, torch.stack(sums).double(), rtol=1e-5, atol=1e-4)
        assert counts == [int(c) for c in count]


def test_evaluate_per_head_over_val_split(tiny_dataset):
    model = tiny_model(2)
    r = evaluate_per_head(model, tiny_dataset, seq_len=16, batch_size=4, max_batches=3, lookahead=3)
    stream = ArrowTokenStream([DataSource(str(p)) for p in tiny_dataset], window=19, micro_batch_size=4,
                              split="val", prefetch=0, infinite=False)
    ce, correct, count = (torch.zeros(2, dtype=torch.float64) for _ in range(3))
    for k, tokens in enumerate(stream):
        if k == 3:
            break
        s, c, n = hand_per_head(model, tokens, 16, pad_id=stream.pad_id)
        ce, correct, count = ce + s, correct + c, count + n
    assert r.batches == 3 and r.tokens == [3 * 4 * 16] * 2 == count.tolist()
    torch.testing.assert_close(torch.tensor(r.loss, dtype=torch.float64), ce / count, rtol=1e-5, atol=1e-6)
    assert r.accuracy == (correct / count).tolist()
    with pytest.raises(ValueError, match="lookahead"):
        evaluate_per_head(model, tiny_dataset, seq_len=16, lookahead=1)


# ----------------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------------

def test_greedy_decoding_paths_agree():
    model = tiny_model(2)
    prompts = [[5, 9, 1, 2, 3, 4, 8], [7], [3, 3, 3, 1]]
    one_by_one = [full_recompute_greedy(model, [p], 6)[0] for p in prompts]
    assert full_recompute_greedy(model, prompts, 6) == one_by_one  # right padding is harmless
    eos = one_by_one[0][2]
    stopped = full_recompute_greedy(model, prompts, 6, eos_id=eos)
    for s, o in zip(stopped, one_by_one):
        assert s == (o[: o.index(eos) + 1] if eos in o else o)
    assert generate_ids(model, prompts, 6) == one_by_one
    assert generate_ids(model, prompts, 6, mode="self_speculative") == one_by_one
    assert generate_ids(model, prompts, 6, eos_id=eos) == stopped
    assert generate_ids(model, prompts, 6, use_cache=False) == one_by_one


class _Bytes:
    eos_id, bos_id = 258, 257

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def test_make_generate_and_batch_logits():
    model = tiny_model(1, max_seq_len=24)
    tok = _Bytes()
    gen = make_generate(model, tok, prefix_ids=[tok.eos_id], use_cache=False)
    prompts = ["(x)+(2)=", "a much longer prompt than the model's context allows"]
    outs = gen(prompts, 5)
    ids = full_recompute_greedy(model, [[258] + tok.encode(prompts[0]), tok.encode(prompts[1])[-19:]], 5,
                                eos_id=258)
    assert outs == [tok.decode(i[: i.index(258)] if 258 in i else i) for i in ids]
    seqs = [[1, 2, 3, 4], [5, 6]]
    got = make_batch_logits(model, batch_size=2, prefix_ids=[258])(seqs)
    for s, g in zip(seqs, got):
        want = model(torch.tensor([[258] + s]))[0][0, 1:]
        assert g.shape == (len(s), VOCAB)
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)


def test_make_generate_seeded_sampling_differs_across_calls():
    """pass@k repeats a prompt across batches: a seeded sampler must not repeat its samples
    call after call, yet the whole sequence of calls is reproducible."""
    model = tiny_model(2)
    tok = _Bytes()
    runs = []
    for _ in range(2):
        gen = make_generate(model, tok, mode="sample", temperature=1.0, seed=0, stop_at_eos=False)
        runs.append([gen(["ab", "ab"], 12) for _ in range(3)])
    assert runs[0] == runs[1]
    assert len({tuple(call) for call in runs[0]}) == 3, runs[0]


# ----------------------------------------------------------------------------------------------
# mtp-eval on a tiny random export
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """An export (model.safetensors, config.json, tokenizer.json) of a random n=2 model whose
    tokenizer is a small BPE trained on stories (so induction finds two-token names)."""
    out = tmp_path_factory.mktemp("export")
    tok = BPETokenizer.train(induction.training_stories(300, seed=0), 300, show_progress=False)
    tok.save(out / "tokenizer.json")
    model = tiny_model(2, vocab=max(VOCAB, tok.vocab_size), max_seq_len=512)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"model": asdict(model.cfg), "step": 0}))
    return out


def _check_outputs(out: Path, task: str) -> dict:
    record = json.loads((out / f"{task}.json").read_text())
    md = (out / f"{task}.md").read_text()
    assert record["task"] == task and record["n_future"] == 2 and md.startswith(f"## mtp-eval {task}")
    assert "|---|" in md
    return record


def test_cli_per_head(tiny_export, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    cli.evaluate(["per_head", "--checkpoint", str(tiny_export), "--out", str(out), "--seq-len", "16",
              "--max-batches", "2", "--batch-size", "2", *sum((["--data", str(p)] for p in tiny_dataset), [])])
    r = _check_outputs(out, "per_head")["result"]
    assert len(r["loss"]) == 2 and r["batches"] == 2 and r["tokens"] == [64, 64]
    assert all(4.0 < l < 7.0 for l in r["loss"])  # ~ln(320) for a random model


def test_cli_polynomial(tiny_export, tmp_path):
    out = tmp_path / "out"
    cli.evaluate(["polynomial", "--checkpoint", str(tiny_export), "--out", str(out), "--limit", "1",
              "--max-new-tokens", "4", "--ops", "1-2", "--ood-ops", "6"])
    r = _check_outputs(out, "polynomial")["result"]
    assert set(r["test_in_domain"]["accuracy"]) == {"1", "2"} and set(r["test_out_of_domain"]["accuracy"]) == {"6"}
    assert r["test_in_domain"]["mean"] == 0.0  # a random model does not do algebra in 4 tokens


def test_cli_induction(tiny_export, tmp_path):
    out = tmp_path / "out"
    cli.evaluate(["induction", "--checkpoint", str(tiny_export), "--out", str(out), "--limit", "2"])
    r = _check_outputs(out, "induction")["result"]
    assert r["stories"] == 2 and r["targets"] > 0 and 0.0 <= r["accuracy"] <= 1.0


def test_cli_humaneval(tiny_export, tmp_path):
    out = tmp_path / "out"
    cli.evaluate(["humaneval", "--checkpoint", str(tiny_export), "--out", str(out), "--limit", "2",
              "--max-new-tokens", "4"])
    r = _check_outputs(out, "humaneval")["result"]
    assert r["problems"] == 2 and r["pass_at_k"] == {"1": 0.0} and sum(r["statuses"].values()) == 2


def test_cli_wandb_failure_is_not_fatal(tiny_export, tmp_path, monkeypatch, capsys):
    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("no wandb here")

    monkeypatch.setattr(wandb, "init", broken_init)
    record = cli.evaluate(["induction", "--checkpoint", str(tiny_export), "--limit", "1",
                       "--wandb-run-id", "abc123", "--wandb-mode", "offline"])
    assert record["result"]["stories"] == 1
    assert "wandb logging skipped" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# finetuning n=4 -> n=1 through the trainer
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def n4_run(tiny_dataset, tmp_path_factory) -> Path:
    from conftest import tiny_overrides

    run_dir = tmp_path_factory.mktemp("n4") / "run"
    code, _ = run_inprocess(tiny_overrides(tiny_dataset) + ["train.max_steps=2", "checkpoint.interval=0",
                                                            "logging.val_interval=0"], run_dir)
    assert code == 0
    return run_dir


@pytest.mark.parametrize("source", ["checkpoint", "export"])
def test_finetune_n4_into_n1_copies_trunk_and_head1(n4_run, tiny_dataset, tmp_path, source):
    from conftest import tiny_overrides

    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.train import Trainer

    init = n4_run / "checkpoints" if source == "checkpoint" else export_single_file(n4_run / "checkpoints",
                                                                                  tmp_path / "export")
    n4_model, _ = load_model(n4_run / "checkpoints")
    src = n4_model.state_dict()
    assert n4_model.n_future == 4
    if source == "export":
        assert set(load_file(init / "model.safetensors")) == set(src)
    cfg = compose_job_config(tiny_overrides(tiny_dataset) + [
        "model.n_future=1", f"train.init_from={init}", "train.max_steps=1", "train.resume=never",
        "checkpoint.interval=0", "logging.val_interval=0"])
    trainer = Trainer(cfg, tmp_path / "finetune")
    try:
        own = trainer.model.state_dict()
        assert trainer.model.n_future == 1
        assert not any(k.startswith("heads.1.") for k in own)
        assert set(own) == {k for k in src if not k.startswith(("heads.1.", "heads.2.", "heads.3."))}
        for k, v in own.items():
            assert torch.equal(v, src[k]), k  # bitwise: trunk, embeddings, head 1, unembedding
        # the n=1 model is head 1 of the n=4 model: same next-token logits
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(trainer.model(tokens)[0], n4_model(tokens)[0], rtol=0, atol=0)
        assert trainer.train() == 0  # and it finetunes
    finally:
        trainer.close()


def test_cli_per_head_defaults_to_checkpoint_sources(n4_run, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["per_head", "--checkpoint", str(n4_run / "checkpoints"), "--out", str(out), "--seq-len", "16",
              "--max-batches", "1", "--batch-size", "2"]) is None  # the console script
    record = json.loads((out / "per_head.json").read_text())
    assert record["step"] == 2 and len(record["result"]["loss"]) == 4
    assert len(record["result"]["sources"]) == 2
