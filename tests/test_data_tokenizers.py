"""Tokenizers users bring: GPT-2 / Llama-3 / Llama-2 style `tokenizers` files and a tiktoken BPE
file, built here from the libraries; special-token roles mapped by name and recorded in
metadata.json; tokenize -> train a few steps -> mtp-generate -> Hugging Face export decodes alike."""

from __future__ import annotations

import base64
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.tokenize_corpus import tokenize_to_dataset
from mtp_pretrain.data import load_tokenizer
from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import read_metadata
from mtp_pretrain.data.tokenizer import LLAMA3_SPLIT_PATTERN, open_tokenizer_source, tiktoken_to_tokenizers
from mtp_pretrain.loss import head_targets

TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i % 7} times, then rests." for i in range(60)]
TEXTS += ["def add(a, b):\n    return a + b\n", "naïve café — 日本語 🙂", "mentions <|endoftext|> and </s> literally"]


def bytelevel_bpe(specials: list[str], vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def llama2_style():
    """SentencePiece-like BPE as Llama 2's tokenizer.json: '▁' for spaces, byte fallback, <unk> <s> </s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + bytes_,
                                                       show_progress=False))
    return tok


def write_tiktoken_file(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file (Llama 3's tokenizer.model format) whose ranks are the merge order of a
    byte-level BPE trained here: byte tokens first, then each merge's result."""
    tok = bytelevel_bpe([], vocab_size=420)
    char_to_byte = {c: b for b, c in zip(range(256), _byte_chars())}
    by_id = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes(char_to_byte[c] for c in token): i for i, (token, _) in enumerate(by_id)}
    assert len(ranks) == len(by_id)  # every byte-level string maps to distinct bytes
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return ranks


def _byte_chars() -> list[str]:
    from mtp_pretrain.data.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


STYLES = {
    # name: (builder of the tokenizer directory, extra role flags, expected roles)
    "gpt2": ({"pad": "<|endoftext|>"}, {"eos": "<|endoftext|>", "bos": None, "pad": "<|endoftext|>"}),
    "llama3": ({}, {"eos": "<|end_of_text|>", "bos": "<|begin_of_text|>", "pad": None}),
    "llama2": ({}, {"eos": "</s>", "bos": "<s>", "pad": None}),
    "tiktoken": ({}, {"eos": "<|end_of_text|>", "bos": "<|begin_of_text|>", "pad": None}),
}


def make_tokenizer_dir(style: str, root: Path) -> Path:
    d = root / f"tok-{style}"
    d.mkdir()
    if style == "gpt2":  # a bare tokenizer.json, no config: EOS found by its conventional name
        bytelevel_bpe(["<|endoftext|>"]).save(str(d / "tokenizer.json"))
        return d / "tokenizer.json"
    if style == "llama3":
        bytelevel_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]).save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "tokenizer_class": "PreTrainedTokenizerFast"}))
        return d
    if style == "llama2":
        llama2_style().save(str(d / "tokenizer.json"))
        (d / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": {"content": "</s>"}, "unk_token": "<unk>"}))
        return d
    write_tiktoken_file(d / "tokenizer.model")
    return d


@pytest.mark.parametrize("style", list(STYLES))
def test_tokenizer_styles_roles_and_round_trip(style, tmp_path):
    flags, roles = STYLES[style]
    src = make_tokenizer_dir(style, tmp_path)
    docs = [{"text": t, "source": ""} for t in TEXTS]
    meta = tokenize_to_dataset(docs, src, tmp_path / "ds", source_description=style, val_fraction=0.0, roles=flags)
    recorded = meta["tokenizer"]
    assert {r: recorded[f"{r}_token"] for r in ("eos", "bos", "pad")} == roles
    tok = load_tokenizer(tmp_path / "ds")
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (recorded["eos_id"], recorded["bos_id"], recorded["pad_id"])
    assert tok.eos_id is not None and (roles["bos"] is None) == (tok.bos_id is None)
    # The stream cut at EOS decodes to the documents (the literal "<|endoftext|>" stays text).
    from pyarrow import ipc, memory_map

    tokens = np.concatenate([ipc.open_file(memory_map(str(tmp_path / "ds" / s["file"]))).read_all().column(0).to_numpy()
                             for s in meta["splits"]["train"]["shards"]])
    cuts = np.flatnonzero(tokens == tok.eos_id)
    assert len(cuts) == len(TEXTS) == meta["splits"]["train"]["num_documents"]
    assert [tok.decode(d) for d in np.split(tokens, cuts + 1)[:-1]] == TEXTS


def test_tiktoken_conversion_gives_tiktokens_ids(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model")
    specials = {"<|begin_of_text|>": len(ranks), "<|end_of_text|>": len(ranks) + 1}
    reference = tiktoken.Encoding("t", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    ours = tiktoken_to_tokenizers(tmp_path / "tokenizer.model", special_tokens=list(specials))
    text = "\n\n".join(TEXTS) + " Unseen words: zyxwvut QUICKLY 1234567 tabs\t\tend.  "
    expected = reference.encode_ordinary(text)
    got = ours.encode(text, add_special_tokens=False).ids
    assert len(expected) > 100 and got == expected
    assert ours.token_to_id("<|end_of_text|>") == len(ranks) + 1 and ours.decode(got) == text


def test_pad_equal_to_eos_keeps_every_eos_target(tmp_path):
    """GPT-2 convention PAD == EOS: the loader hands the loss no PAD id, so no EOS target is lost."""
    from mtp_pretrain.data.dataset import TokenWindows

    src = make_tokenizer_dir("gpt2", tmp_path)
    tokenize_to_dataset([{"text": t, "source": ""} for t in TEXTS], src, tmp_path / "ds", source_description="t",
                        val_fraction=0.0, roles={"pad": "<|endoftext|>"})
    windows = TokenWindows(tmp_path / "ds", "train", 64)
    assert windows.pad_id is None
    batch = np.zeros(64, np.int64)
    windows.read(0, batch)
    tokens = torch.from_numpy(batch)[None]
    assert (tokens == windows.eos_id).sum() >= 1
    targets = head_targets(tokens, 63, 1, windows.pad_id)[0]
    assert (targets == windows.eos_id).sum() == (tokens[:, 1:] == windows.eos_id).sum()


def test_missing_or_unknown_role_is_a_clear_error(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    bytelevel_bpe(["<|custom_end|>"]).save(str(d / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer.json: no end-of-document token; pass --eos-token"):
        open_tokenizer_source(d)
    with pytest.raises(DataError, match=r"eos token '<\|nope\|>' is not in the tokenizer's vocabulary"):
        open_tokenizer_source(d, eos_token="<|nope|>")
    tok, _ = open_tokenizer_source(d, eos_token="<|custom_end|>")
    assert tok.eos_id == 0 and tok.bos_id is None and tok.pad_id is None


@pytest.mark.parametrize("style", list(STYLES))
def test_tokenize_train_generate_export_hf(style, tmp_path):
    """A user's tokenizer end to end: the dataset trains a tiny model a few steps, mtp-generate
    decodes with the dataset's roles, and the Hugging Face export's tokenizer decodes the same ids
    to the same text and names the same EOS."""
    transformers = pytest.importorskip("transformers")
    from mtp_pretrain.config import (CheckpointConfig, DataConfig, DataSourceConfig, JobConfig, LoggingConfig,
                                     OptimConfig, TrainConfig, WandbConfig)
    from mtp_pretrain.export import main as export_main
    from mtp_pretrain.inference.cli import main as generate_main
    from mtp_pretrain.model import ModelConfig
    from mtp_pretrain.train import Trainer

    flags, roles = STYLES[style]
    src = make_tokenizer_dir(style, tmp_path)
    meta = tokenize_to_dataset([{"text": t, "source": ""} for t in TEXTS * 4], src, tmp_path / "ds",
                               source_description=style, val_fraction=0.0, roles=flags)
    vocab = meta["tokenizer"]["vocab_size"]
    job = JobConfig(
        model=ModelConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, n_future=2, max_seq_len=64),
        data=DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "ds"))], seq_len=32, prefetch=0),
        optim=OptimConfig(lr=3e-3, warmup_steps=0),
        train=TrainConfig(max_steps=3, micro_batch_size=2, resume="never", device="cpu", dtype="float32"),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), interval=3),
        logging=LoggingConfig(interval=1, val_interval=0, wandb=WandbConfig(mode="disabled")))
    trainer = Trainer(job, tmp_path / "run")
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    export_main([str(tmp_path / "ckpt"), str(tmp_path / "export")])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate_main([str(tmp_path / "export"), "--prompt", "the quick brown", "--max-new-tokens", "12",
                       "--no-eos", "--json"])
    (record,) = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    assert len(record["token_ids"]) == 12
    ours = load_tokenizer(tmp_path / "export" / "tokenizer.json")
    t = meta["tokenizer"]
    assert (ours.eos_id, ours.bos_id, ours.pad_id) == (t["eos_id"], t["bos_id"], t["pad_id"])  # roles travel
    assert record["text"] == ours.decode(record["token_ids"])

    export_main([str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--format", "hf"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token == roles["eos"] and hf_tok.eos_token_id == meta["tokenizer"]["eos_id"]
    assert hf_tok.pad_token == roles["pad"] and hf_tok.bos_token == roles["bos"]
    assert hf_tok.decode(record["token_ids"], skip_special_tokens=True) == record["text"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == meta["tokenizer"]["eos_id"] and config["bos_token_id"] == meta["tokenizer"]["bos_id"]


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_megatron_round_trip_keeps_the_roles(style, tmp_path):
    """export-megatron of a dataset made with a user's tokenizer, then import-megatron with that
    tokenizer and the same role flags: same roles and ids, same token stream."""
    from data_tools.megatron import export_megatron, import_megatron

    flags, roles = STYLES[style]
    src = make_tokenizer_dir(style, tmp_path)
    meta = tokenize_to_dataset([{"text": t, "source": ""} for t in TEXTS], src, tmp_path / "ds",
                               source_description=style, val_fraction=0.0, roles=flags)
    export_megatron(tmp_path / "ds", tmp_path / "mega" / "corpus")
    back = import_megatron([tmp_path / "mega" / "corpus"], src, tmp_path / "back", roles=flags)
    assert back["tokenizer"] == meta["tokenizer"]
    assert {r: back["tokenizer"][f"{r}_token"] for r in ("eos", "bos", "pad")} == roles
    from pyarrow import ipc, memory_map

    def tokens(d):
        return np.concatenate([ipc.open_file(memory_map(str(d / s["file"]))).read_all().column(0).to_numpy()
                               for s in read_metadata(d)["splits"]["train"]["shards"]])
    assert np.array_equal(tokens(tmp_path / "back"), tokens(tmp_path / "ds"))
    assert back["splits"]["train"]["num_documents"] == len(TEXTS)


def test_continued_pretraining_from_a_hf_llama_with_its_own_tokenizer(tmp_path):
    """train.init_from_hf on a Llama directory whose tokenizer.json (Llama-3 style) also tokenized
    the data: trains, and the Hugging Face export carries that very tokenizer and its roles."""
    transformers = pytest.importorskip("transformers")
    from mtp_pretrain.config import (CheckpointConfig, DataConfig, DataSourceConfig, JobConfig, LoggingConfig,
                                     OptimConfig, TrainConfig, WandbConfig)
    from mtp_pretrain.interop.hf import export_hf, model_config_from_hf
    from mtp_pretrain.train import Trainer

    llama_dir = make_tokenizer_dir("llama3", tmp_path)
    tok, _ = open_tokenizer_source(llama_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_id,
                                      eos_token_id=tok.eos_id, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(llama_dir)
    meta = tokenize_to_dataset([{"text": t, "source": ""} for t in TEXTS * 4], llama_dir, tmp_path / "ds",
                               source_description="llama", val_fraction=0.0)
    job = JobConfig(
        model=model_config_from_hf(llama_dir, n_future=2),
        data=DataConfig(sources=[DataSourceConfig(path=str(tmp_path / "ds"))], seq_len=32, prefetch=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(max_steps=2, micro_batch_size=2, resume="never", init_from_hf=str(llama_dir),
                          device="cpu", dtype="float32"),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), interval=2),
        logging=LoggingConfig(interval=1, val_interval=0, wandb=WandbConfig(mode="disabled")))
    trainer = Trainer(job, tmp_path / "run")
    try:
        assert trainer.train() == 0
    finally:
        trainer.close()
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert (out / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf_tok.eos_token, hf_tok.bos_token) == ("<|end_of_text|>", "<|begin_of_text|>")
    assert hf_tok.eos_token_id == meta["tokenizer"]["eos_id"] == config.eos_token_id
    ids = tok.encode(TEXTS[0])
    assert hf_tok.decode(ids) == TEXTS[0]


def test_dataset_written_before_roles_were_recorded_still_loads(tmp_path):
    """metadata.json of the previous format (ids only, no role names, no tokenizer_config.json):
    the project's own tokenizers are found by their conventional names, ids checked as before."""
    from mtp_pretrain.data.dataset import TokenWindows
    from mtp_pretrain.data.shards import write_metadata
    from mtp_pretrain.data.synthetic import write_random_dataset

    write_random_dataset(tmp_path / "old", {"train": 4000, "val": 400}, doc_len=50)
    meta = read_metadata(tmp_path / "old")
    for role in ("eos", "bos", "pad"):
        del meta["tokenizer"][f"{role}_token"]
    write_metadata(tmp_path / "old", meta)
    (tmp_path / "old" / "tokenizer_config.json").unlink(missing_ok=True)
    windows = TokenWindows(tmp_path / "old", "train", 64)
    assert (windows.eos_id, windows.pad_id) == (258, 256)
    assert load_tokenizer(tmp_path / "old").role_tokens()["eos"] == "<|eos|>"
