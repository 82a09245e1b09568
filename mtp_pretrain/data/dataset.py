"""One split of one tokenized dataset, memory-mapped and cut into fixed-size windows."""

from __future__ import annotations

from bisect import bisect_right
from pathlib import Path

import numpy as np

from .errors import DataError
from .shards import SPLITS, open_shard, read_metadata, token_dtype
from .tokenizer import TOKENIZER_FILE, load_tokenizer


class TokenWindows:
    """The token stream of one split (its shards concatenated in order) as windows of `window` tokens.

    Window i is tokens [i*window, (i+1)*window): packing is plain concatenation, documents are
    already separated by EOS, and a window may span two documents or two shards. The last
    `< window` tokens of the split are never used. Nothing is loaded: shards are memory-mapped and
    a read touches only the pages of the requested window.
    """

    def __init__(self, path: str | Path, split: str, window: int, verify: str = "size"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.path = Path(path)
        self.meta = read_metadata(self.path)
        self.tokenizer = load_tokenizer(self.path)  # checks the tokenizer against metadata.json
        tmeta = self.meta["tokenizer"]
        self.vocab_size, self.eos_id = tmeta["vocab_size"], tmeta["eos_id"]
        # The id the loss ignores as padding: none when PAD is absent or doubles as EOS (GPT-2,
        # Llama 3 fine-tunes), since every EOS ending a document must stay a target.
        self.pad_id = tmeta["pad_id"] if tmeta["pad_id"] != self.eos_id else None
        self.tokenizer_hash = tmeta["hash"]
        dtype = token_dtype(self.vocab_size)
        if np.dtype(self.meta["token_dtype"]) != dtype:
            raise DataError(f"{self.path / 'metadata.json'}: token_dtype {self.meta['token_dtype']} but vocab {self.vocab_size} needs {dtype}")

        self._chunks: list[np.ndarray] = []
        self._chunk_files: list[Path] = []
        self._starts: list[int] = []
        total = 0
        for entry in self.meta["splits"][split]["shards"]:
            shard_path = self.path / entry["file"]
            for arr in open_shard(shard_path, entry, dtype, self.vocab_size, verify):
                self._starts.append(total)
                self._chunks.append(arr)
                self._chunk_files.append(shard_path)
                total += len(arr)
        self.num_tokens = total
        self.window = window
        self.num_windows = total // window
        if self.num_windows == 0:
            raise DataError(f"{self.path}: split '{split}' has {total} tokens, fewer than one window of {window}")

    def read(self, index: int, out: np.ndarray) -> None:
        """Copy window `index` into `out` (shape [window], any integer dtype)."""
        pos, end = index * self.window, (index + 1) * self.window
        c = bisect_right(self._starts, pos) - 1
        filled = 0
        while pos < end:
            chunk, start = self._chunks[c], self._starts[c]
            take = min(end - pos, start + len(chunk) - pos)
            piece = chunk[pos - start : pos - start + take]
            if take and int(piece.max()) >= self.vocab_size:
                raise DataError(f"{self._chunk_files[c]}: token id {int(piece.max())} >= vocab size {self.vocab_size} (corrupt shard)")
            out[filled : filled + take] = piece
            filled += take
            pos += take
            c += 1

    @property
    def tokenizer_file(self) -> Path:
        return self.path / TOKENIZER_FILE
