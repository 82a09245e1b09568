"""Tokenizers of the pipeline: any Hugging Face fast tokenizer, a tiktoken BPE file, the project's
own byte-level BPE (trained with `tokenizers`) and a plain byte tokenizer.

A dataset directory holds its tokenizer as one `tokenizer.json` (a tiktoken file is converted to
that format once, when a dataset is built) and the special-token *roles* in metadata.json and in a
Hugging Face `tokenizer_config.json` beside it. Roles are mapped, not required by name:
EOS ends every document and is required; BOS and PAD are optional (None). The tokenizer hash is
the SHA-256 of tokenizer.json, so that a dataset can refuse a tokenizer it was not built with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from .errors import DataError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
# BPE: the trainer gives the special tokens the first ids, in this order.
SPECIAL_TOKENS = [PAD, BOS, EOS]
ROLES = ("eos", "bos", "pad")
# Used when neither the command line nor the tokenizer's config names a role: the project's own
# names, then those of GPT-2, Llama 3 and Llama 2 / SentencePiece models, first match wins.
CONVENTIONAL_NAMES = {
    "eos": (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"),
    "bos": (BOS, "<|begin_of_text|>", "<s>", "<bos>"),
    "pad": (PAD, "<pad>", "[PAD]"),
}
# tiktoken BPE files (Llama 3's tokenizer.model) hold only the ranks; the split pattern and the
# special tokens live in the model's code. These are Llama 3's.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, LLAMA3_NUM_SPECIAL - 9)]


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ByteTokenizer:
    """Bytes 0..255 are ids 0..255; PAD, BOS, EOS follow (256, 257, 258). Lossless for any UTF-8."""

    kind = "byte_level"

    def __init__(self, hash_: str = ""):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 259
        self.hash = hash_

    def role_tokens(self) -> dict[str, Optional[str]]:
        return {"eos": EOS, "bos": BOS, "pad": PAD}

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


class HFTokenizer:
    """Any `tokenizers` (Hugging Face fast) tokenizer, with its special-token roles mapped by name.

    ``roles`` maps eos/bos/pad to token names (bos/pad may be None); EOS is required.
    """

    kind = "tokenizers"

    def __init__(self, tokenizer, hash_: str = "", roles: Optional[dict] = None, source: str = "tokenizer"):
        self._tok = tokenizer
        # A document that literally contains "<|endoftext|>" must not turn into a document boundary.
        self._tok.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        self.hash = hash_
        self.roles = dict(roles) if roles is not None else conventional_roles(tokenizer)
        for role in ROLES:
            name = self.roles.get(role)
            token_id = None if name is None else tokenizer.token_to_id(name)
            if name is not None and token_id is None:
                raise DataError(f"{source}: {role} token {name!r} is not in the tokenizer's vocabulary "
                                f"(special tokens: {special_token_names(tokenizer)})")
            setattr(self, f"{role}_id", token_id)
        if self.eos_id is None:
            raise DataError(f"{source}: no end-of-document token; pass --eos-token NAME (documents are separated "
                            f"by it). The tokenizer's special tokens: {special_token_names(tokenizer)}")

    def role_tokens(self) -> dict[str, Optional[str]]:
        return {role: self.roles.get(role) for role in ROLES}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))
        self.hash = file_hash(path)


class BPETokenizer(HFTokenizer):
    """The project's own byte-level BPE (lossless: every string round-trips), with PAD, BOS, EOS
    as ids 0, 1, 2."""

    kind = "bpe"

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


Tokenizer = ByteTokenizer | HFTokenizer


def special_token_names(tokenizer) -> list[str]:
    return [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]


def conventional_roles(tokenizer) -> dict[str, Optional[str]]:
    """Each role's first conventional name that the tokenizer has, else None."""
    return {role: next((n for n in names if tokenizer.token_to_id(n) is not None), None)
            for role, names in CONVENTIONAL_NAMES.items()}


def _token_name(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def configured_roles(directory: Path) -> dict[str, str]:
    """Roles named by the Hugging Face config files in ``directory`` (tokenizer_config.json wins
    over special_tokens_map.json); roles they do not name are absent."""
    roles: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE):
        path = directory / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: unreadable tokenizer config: {e}") from e
        for role in ROLES:
            if (token := _token_name(config.get(f"{role}_token"))) is not None:
                roles[role] = token
    return roles


def _recorded_roles(directory: Path) -> Optional[dict]:
    """The roles a dataset's metadata.json records (None for no metadata, or one written before
    roles were recorded: its tokenizer uses the project's own names)."""
    meta_path = directory / "metadata.json"
    if not meta_path.is_file():
        return None
    recorded = json.loads(meta_path.read_text()).get("tokenizer", {})
    if "eos_token" not in recorded:
        return None
    return {role: recorded.get(f"{role}_token") for role in ROLES}


def _is_byte_spec(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        return b'"kind"' in head and json.loads(path.read_text()).get("kind") == ByteTokenizer.kind
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def _read_tokenizer_file(path: Path, roles: Optional[dict] = None) -> Tokenizer:
    """A tokenizer.json (Hugging Face, or the byte tokenizer's spec). Roles: ``roles`` if given,
    else those recorded beside it (metadata.json, then the HF config files), else conventional."""
    if _is_byte_spec(path):
        return ByteTokenizer(file_hash(path))
    from tokenizers import Tokenizer as RustTokenizer

    try:
        raw = RustTokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise DataError(f"{path}: not a valid tokenizer file: {e}") from e
    if roles is None:
        roles = _recorded_roles(path.parent)
    if roles is None:
        roles = {**conventional_roles(raw), **configured_roles(path.parent)}
    cls = BPETokenizer if all(raw.token_to_id(n) == i for i, n in enumerate(SPECIAL_TOKENS)) else HFTokenizer
    return cls(raw, file_hash(path), roles, source=str(path))


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


def write_role_config(tok: Tokenizer, directory: Path) -> None:
    """tokenizer_config.json naming the roles beside a tokenizer.json, in the Hugging Face format
    (so the directory also loads with transformers' AutoTokenizer)."""
    roles = {f"{role}_token": name for role, name in tok.role_tokens().items() if name is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles}
    (Path(directory) / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------
# Tokenizers as users bring them: a tokenizer.json file or directory, or a tiktoken BPE file
# ------------------------------------------------------------------------------------------------

def open_tokenizer_source(source: str | Path, eos_token: Optional[str] = None, bos_token: Optional[str] = None,
                          pad_token: Optional[str] = None) -> tuple[Tokenizer, object]:
    """The tokenizer a user names with --tokenizer, and what to store as the dataset's
    tokenizer.json (a path to copy, or a `tokenizers` object to save).

    ``source``: a tokenizer.json, a directory holding one (its tokenizer_config.json /
    special_tokens_map.json name the roles), a tiktoken BPE file (Llama 3's tokenizer.model) or a
    directory holding one, or the byte tokenizer's spec. Explicit role names win over configured
    ones, which win over conventional names.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: tokenizer does not exist (expected a tokenizer.json, a directory holding one, "
                        "or a tiktoken BPE file)")
    directory = source if source.is_dir() else source.parent
    if source.is_dir():
        candidates = [source / TOKENIZER_FILE, source / "tokenizer.model"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise DataError(f"{source}: directory holds neither {TOKENIZER_FILE} nor a tiktoken tokenizer.model")
        source = found[0]
    explicit = {r: n for r, n in (("eos", eos_token), ("bos", bos_token), ("pad", pad_token)) if n is not None}
    if _is_byte_spec(source):
        if explicit:
            raise DataError(f"{source}: the byte tokenizer's roles are fixed; drop --eos/--bos/--pad-token")
        return ByteTokenizer(file_hash(source)), source
    try:
        json.loads(source.read_text())
        is_json = True
    except (UnicodeDecodeError, json.JSONDecodeError):
        is_json = False
    if is_json:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            raw = RustTokenizer.from_file(str(source))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise DataError(f"{source}: not a valid Hugging Face tokenizer.json: {e}") from e
        store: object = source
    else:
        raw = tiktoken_to_tokenizers(source)
        store = raw
    roles = {**conventional_roles(raw), **configured_roles(directory), **explicit}
    return HFTokenizer(raw, "", roles, source=str(source)), store


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE: printable Latin-1 bytes map to
    themselves, the others to code points from 256 on, in byte order. Read by the tiktoken import
    here and by the Hugging Face export of the byte tokenizer."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiktoken_to_tokenizers(path: Path, pattern: str = LLAMA3_SPLIT_PATTERN,
                           special_tokens: Optional[list[str]] = None):
    """A tiktoken BPE file as an equivalent `tokenizers` byte-level BPE (same ids for every text).

    tiktoken merges, within each pre-tokenized piece, the adjacent pair whose concatenation has the
    lowest rank, and takes a piece that is itself a token whole. A BPE model whose merges are
    ordered by the rank of their result, with ``ignore_merges``, does the same. Special tokens
    follow the ranks (Llama 3's 256 by default).
    """
    import tiktoken.load
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    except Exception as e:  # base64/ValueError from a file of another format
        raise DataError(f"{path}: neither a tokenizer.json nor a tiktoken BPE file (lines 'base64-token rank'): {e}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps")
    byte_chars = bytes_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        pairs = [(ranks[a], ranks[b], a, b) for a, b in splits if a in ranks and b in ranks]
        merges += [(as_text(a), as_text(b)) for _, _, a, b in sorted(pairs) if max(ranks[a], ranks[b]) < rank]
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = LLAMA3_SPECIAL_TOKENS if special_tokens is None else special_tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok
