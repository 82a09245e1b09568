"""`inspect`: a dataset's metadata, token counts, a decoded sample, and a checksum check of every shard."""

from __future__ import annotations

from pathlib import Path

from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import SPLITS, open_shard, read_metadata, token_dtype
from mtp_pretrain.data.tokenizer import load_tokenizer


def inspect_dataset(path: str | Path, verify: bool = True, sample_tokens: int = 200) -> list[str]:
    """Print a report; return the list of problems found (empty: the dataset is sound)."""
    path = Path(path)
    problems: list[str] = []
    meta = read_metadata(path)
    tok = load_tokenizer(path)
    t = meta["tokenizer"]
    print(f"dataset      {path}")
    print(f"source       {meta['source']}")
    roles = " ".join(f"{r}={t[f'{r}_id']}" + (f" {t[f'{r}_token']!r}" if t.get(f"{r}_token") else "") for r in ("pad", "bos", "eos"))
    print(f"tokenizer    {t['kind']} vocab={t['vocab_size']} hash={t['hash']} {roles}")
    raw = meta.get("raw_text_bytes")  # absent for datasets imported from token files (import-megatron)
    print(f"token dtype  {meta['token_dtype']}" + (f"   raw text {raw / 1e6:.2f} MB" if raw is not None else ""))
    dtype = token_dtype(t["vocab_size"])
    for split in SPLITS:
        info = meta["splits"][split]
        print(f"{split:5s}        {info['num_tokens']:>12,} tokens  {info['num_documents']:>8,} documents  {len(info['shards'])} shards")
        for entry in info["shards"]:
            shard = path / entry["file"]
            try:
                open_shard(shard, entry, dtype, t["vocab_size"], "checksum" if verify else "size")
                status = "ok (sha256)" if verify else "ok (size)"
            except DataError as e:
                status = f"BAD: {e}"
                problems.append(str(e))
            print(f"  {entry['file']:20s} {entry['num_tokens']:>12,} tokens {entry['bytes']:>12,} B  {status}")

    first = meta["splits"]["train"]["shards"][:1]
    if first and not problems:
        arrays = open_shard(path / first[0]["file"], first[0], dtype, t["vocab_size"], "size")
        ids = arrays[0][:sample_tokens].tolist()
        print(f"\nfirst {len(ids)} tokens of {first[0]['file']}, decoded:\n{'-' * 60}\n{tok.decode(ids)}\n{'-' * 60}")
    print("verdict      " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return problems
