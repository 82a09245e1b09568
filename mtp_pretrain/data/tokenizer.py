"""Tokenizers of the pipeline: a byte-level BPE (trained with `tokenizers`) and a plain byte tokenizer.

Both are stored as one `tokenizer.json` beside a dataset's shards. Their special tokens have fixed
ids (PAD, BOS, EOS) that are recorded in the dataset metadata. The tokenizer hash is the SHA-256 of
that file, so that a dataset can refuse a tokenizer it was not built with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import DataError

TOKENIZER_FILE = "tokenizer.json"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# BPE: the trainer gives the special tokens the first ids, in this order.
SPECIAL_TOKENS = [PAD, BOS, EOS]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255; PAD, BOS, EOS follow (256, 257, 258). Lossless for any UTF-8."""

    kind = "byte_level"

    def __init__(self, hash_: str = ""):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 259
        self.hash = hash_

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def save(self, path: Path) -> None:
        spec = {"kind": self.kind, "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        Path(path).write_text(json.dumps(spec, indent=2) + "\n")
        self.hash = file_hash(path)


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` library (lossless: every string round-trips)."""

    kind = "bpe"

    def __init__(self, tokenizer, hash_: str = ""):
        self._tok = tokenizer
        # A document that literally contains "<|eos|>" must not turn into a document boundary.
        self._tok.encode_special_tokens = True
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
        self.vocab_size = tokenizer.get_vocab_size()
        self.hash = hash_

    @classmethod
    def train(cls, texts, vocab_size: int, show_progress: bool = True) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))
        self.hash = file_hash(path)


Tokenizer = ByteTokenizer | BPETokenizer


def _read_tokenizer_file(path: Path) -> Tokenizer:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read tokenizer: {e}") from e
    if spec.get("kind") == ByteTokenizer.kind:
        return ByteTokenizer(file_hash(path))
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = BPETokenizer(HFTokenizer.from_file(str(path)), file_hash(path))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise DataError(f"{path}: not a valid tokenizer file: {e}") from e
    if None in (tok.pad_id, tok.bos_id, tok.eos_id):
        raise DataError(f"{path}: tokenizer lacks one of the special tokens {SPECIAL_TOKENS}")
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a dataset directory (or a tokenizer.json file).

    For a dataset directory the tokenizer's hash and special ids must match its metadata.json.
    """
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise DataError(f"{path}: tokenizer file does not exist")
        return _read_tokenizer_file(path)
    tok_path = path / TOKENIZER_FILE
    if not tok_path.exists():
        raise DataError(f"{tok_path}: dataset has no tokenizer file")
    tok = _read_tokenizer_file(tok_path)
    meta_path = path / "metadata.json"
    if meta_path.exists():
        check_tokenizer_matches(tok, json.loads(meta_path.read_text()), tok_path)
    return tok


def check_tokenizer_matches(tok: Tokenizer, metadata: dict, tok_path: Path) -> None:
    expected = metadata["tokenizer"]
    if tok.hash != expected["hash"]:
        raise DataError(
            f"{tok_path}: tokenizer hash {tok.hash} does not match the dataset metadata "
            f"({expected['hash']}); the shards were tokenized with another tokenizer"
        )
    ids = {"vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    for key, value in ids.items():
        if expected[key] != value:
            raise DataError(f"{tok_path}: tokenizer {key}={value} but the dataset metadata says {expected[key]}")
