"""Hugging Face ``transformers`` interoperability: export to a Llama directory, initialise from one.

Export (``mtp-export --format hf CHECKPOINT OUT_DIR`` / :func:`export_hf`)
    writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads
    as a ``LlamaForCausalLM`` computing exactly this model's next-token path::

        tok_embeddings -> trunk.0 .. trunk.{L-1} -> heads.0.blocks.* -> heads.0.norm -> unembed

    i.e. ``num_hidden_layers = trunk_layers + head_layers``; head 1's blocks are the last
    ``head_layers`` Llama layers and head 1's final norm is ``model.norm``. The tokenizer is
    written as ``tokenizer.json`` + ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast`` with
    our BOS/EOS/PAD tokens), so ``AutoTokenizer.from_pretrained(OUT_DIR)`` works.

    The rest of the multi-token model goes in a side file in the same directory:

    * ``mtp_config.json``: ``{"format": "mtp_pretrain.hf", "version": 1, "model": {ModelConfig
      fields}, "extra_heads": n-1, "extra_heads_file": "mtp_heads.safetensors" | null, ...}``;
    * ``mtp_heads.safetensors`` (only when n_future > 1): heads 2..n under their own names in
      this framework (``heads.1.*`` .. ``heads.{n-1}.*``), exactly as in the model's state dict.

    transformers ignores both files; :func:`load_hf_model` rebuilds the whole multi-token model
    from the directory, bit for bit.

    Refused (an :class:`HFInteropError` saying why; nothing is written): ``linear`` heads (head 1
    is a d x d map + norm, not a transformer block, so there is no Llama whose next-token path it
    is). ``causal`` heads are exported: their head 1 is a plain transformer head, and heads 2..n
    (which also read token embeddings) go in the side file.

Import (``train.init_from_hf=DIR`` / :func:`load_hf_weights`)
    reads a local Llama-family checkpoint (``config.json`` + ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``) into the trunk (its first ``num_hidden_layers - head_layers``
    layers), head 1 (the last ``head_layers`` layers and ``model.norm``), the embedding and the
    unembedding (``lm_head``, or the embedding when tied). Heads 2..n come from the side file when
    the directory has one (an exact round trip); otherwise (and for heads beyond the side file's)
    by ``extra_heads``: ``"copy"`` (default: each is a copy of head 1's blocks and norm, as in
    Medusa-style practice; a causal head's fusion projection and its two input norms keep their
    fresh initialisation) or ``"fresh"`` (all keep their fresh initialisation).

    Shapes, vocabulary and rotary settings come from the checkpoint's ``config.json`` and must
    agree with the model being initialised (an error names the field); build the model config
    from the checkpoint with :func:`model_config_from_hf` or :func:`hydra_overrides_from_hf`
    (``python -m mtp_pretrain.interop.hf overrides DIR``). Rejected with an error: rope scaling of
    any kind, attention / MLP biases, activations other than SiLU, a head_dim other than
    hidden_size / num_attention_heads, sliding-window attention, partial rotary, non-safetensors
    weights, any weight the Llama layout does not name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtp_pretrain.checkpoint import publish_directory
from mtp_pretrain.checkpoint_reader import (load_partial_state_dict, read_model_config, read_state_dict,
                                            resolve_checkpoint, tokenizer_source, train_state_of)
from mtp_pretrain.data.tokenizer import bytes_to_unicode
from mtp_pretrain.model import ModelConfig, MTPTransformer

SIDE_CONFIG = "mtp_config.json"
SIDE_WEIGHTS = "mtp_heads.safetensors"
SIDE_FORMAT = "mtp_pretrain.hf"
SIDE_VERSION = 1
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
EXTRA_HEAD_RULES = ("copy", "fresh")
LLAMA_FAMILY = ("llama", "mistral")

# Our block parameter names -> Llama decoder-layer parameter names.
_BLOCK_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


class HFInteropError(ValueError):
    """The model or checkpoint cannot be converted exactly; the message says why."""


# --------------------------------------------------------------------------------------------
# Name mapping
# --------------------------------------------------------------------------------------------

def llama_name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> Llama parameter name, for the next-token path (trunk, head 1,
    embedding, unembedding). A tied unembedding has no Llama entry of its own."""
    out = {"tok_embeddings.weight": "model.embed_tokens.weight", "heads.0.norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        out["unembed.weight"] = "lm_head.weight"
    layers = [f"trunk.{j}" for j in range(cfg.trunk_layers)] + [f"heads.0.blocks.{b}" for b in range(cfg.head_layers)]
    for layer, ours in enumerate(layers):
        for k, v in _BLOCK_MAP.items():
            out[f"{ours}.{k}"] = f"model.layers.{layer}.{v}"
    return out


def check_llama_expressible(cfg: ModelConfig) -> None:
    """Raise HFInteropError if the model's next-token path is not a Llama."""
    if cfg.head_type == "linear":
        raise HFInteropError(
            "cannot export to Hugging Face Llama: model.head_type='linear' makes head 1 a d x d linear map "
            "followed by a norm, which is not a transformer block, so no LlamaForCausalLM computes this "
            "model's next-token path (use the single-file export, mtp-export --format single)")
    if cfg.head_type not in ("transformer", "causal"):  # future head types: refuse until mapped
        raise HFInteropError(f"cannot export to Hugging Face Llama: head_type {cfg.head_type!r} has no Llama mapping")


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def llama_config_dict(cfg: ModelConfig, dtype: torch.dtype = torch.float32, bos_id: Optional[int] = None,
                      eos_id: Optional[int] = None, pad_id: Optional[int] = None) -> dict[str, Any]:
    """The ``config.json`` of the exported LlamaForCausalLM. Rotary settings are written both
    the transformers 5 way (``rope_parameters``) and the 4.x way (``rope_theta``)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.trunk_layers + cfg.head_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def split_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our state dict -> (Llama state dict of the next-token path, heads 2..n under our names)."""
    check_llama_expressible(cfg)
    names = llama_name_map(cfg)
    llama = {hf: sd[ours] for ours, hf in names.items()}
    side = {k: v for k, v in sd.items() if k.startswith("heads.") and int(k.split(".")[1]) >= 1}
    left = set(sd) - set(names) - set(side) - ({"unembed.weight"} if cfg.tie_embeddings else set())
    if left:  # a parameter neither path accounts for: refuse rather than drop it silently
        raise HFInteropError(f"cannot export to Hugging Face Llama: parameters with no Llama counterpart: {sorted(left)[:5]}")
    return llama, side


def byte_tokenizer_as_tokenizers(pad: str, bos: str, eos: str):
    """Our ByteTokenizer as a ``tokenizers`` Tokenizer with the same ids: byte b -> id b (a
    byte-level BPE with no merges), then PAD, BOS, EOS as 256, 257, 258."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (pad, bos, eos)])
    return tok


def write_hf_tokenizer(src: Path, out_dir: Path, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json for our tokenizer
    file ``src`` (a BPE tokenizers JSON, or the byte tokenizer's spec). Returns the special ids."""
    from mtp_pretrain.data import load_tokenizer
    from mtp_pretrain.data.tokenizer import BOS, EOS, PAD, ByteTokenizer

    ours = load_tokenizer(src)
    # Optional roles (a GPT-2 tokenizer has no PAD or BOS) are left out of the HF config.
    names = {role: name for role, name in ours.role_tokens().items() if name is not None}
    if isinstance(ours, ByteTokenizer):
        tok = byte_tokenizer_as_tokenizers(PAD, BOS, EOS)
        for role, name in names.items():
            if tok.token_to_id(name) != getattr(ours, f"{role}_id"):
                raise HFInteropError(f"byte tokenizer: {name} would get id {tok.token_to_id(name)}, "
                                     f"not {getattr(ours, f'{role}_id')}")
        tok.save(str(out_dir / "tokenizer.json"))
    else:
        shutil.copy(src, out_dir / "tokenizer.json")
    specials = {f"{role}_token": name for role, name in names.items()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": model_max_length,
         "clean_up_tokenization_spaces": False, "added_tokens_decoder": {}}, indent=1) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=1) + "\n")
    return {"bos_id": ours.bos_id, "eos_id": ours.eos_id, "pad_id": ours.pad_id}


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint or single-file export to a transformers Llama directory (see the module
    docstring). Atomic: written to a temporary sibling directory and renamed into place, so a
    failure leaves no partial directory (and an existing out_dir untouched)."""
    path = resolve_checkpoint(checkpoint)
    cfg = read_model_config(path)
    check_llama_expressible(cfg)  # before reading weights or creating anything
    sd = read_state_dict(path, cfg)
    llama, side = split_state_dict(sd, cfg)
    dtype = sd["tok_embeddings.weight"].dtype
    state = train_state_of(path)
    with publish_directory(out_dir) as tmp:
        ids: dict[str, Optional[int]] = {"bos_id": None, "eos_id": None, "pad_id": None}
        tok = tokenizer_source(path)
        if tok is not None:
            ids = write_hf_tokenizer(tok, tmp, cfg.max_seq_len)
        else:
            import warnings

            warnings.warn(f"{path}: no tokenizer found; the Hugging Face export has no tokenizer files")
        (tmp / HF_CONFIG).write_text(json.dumps(llama_config_dict(cfg, dtype, **ids), indent=1) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]},
            indent=1) + "\n")
        save_file({k: v.contiguous() for k, v in llama.items()}, tmp / HF_WEIGHTS, metadata={"format": "pt"})
        if side:
            save_file({k: v.contiguous() for k, v in side.items()}, tmp / SIDE_WEIGHTS, metadata={"format": "pt"})
        (tmp / SIDE_CONFIG).write_text(json.dumps({
            "format": SIDE_FORMAT, "version": SIDE_VERSION, "model": asdict(cfg),
            "extra_heads": cfg.n_future - 1, "extra_heads_file": SIDE_WEIGHTS if side else None,
            "layout": {"trunk": f"model.layers.0..{cfg.trunk_layers - 1}",
                       "head_1": f"model.layers.{cfg.trunk_layers}..{cfg.trunk_layers + cfg.head_layers - 1} "
                                 f"+ model.norm",
                       "heads_2_to_n": "mtp_heads.safetensors, names as in MTPTransformer.state_dict()"},
            "step": state.get("step"), "tokens_seen": state.get("tokens_seen"), "source": str(path)},
            indent=1) + "\n")
    return Path(out_dir)


# --------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------

def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The raw config.json of a Hugging Face checkpoint directory, checked to be a Llama this
    framework can represent exactly (raises HFInteropError naming the offending setting)."""
    path = Path(path)
    if not (path / HF_CONFIG).is_file():
        raise HFInteropError(f"{path}: no {HF_CONFIG}; init_from_hf needs a local Hugging Face model directory")
    hf = json.loads((path / HF_CONFIG).read_text())
    check_hf_config(hf, str(path))
    return hf


def hf_rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def check_hf_config(hf: dict[str, Any], where: str = "config.json") -> None:
    def bad(msg: str):
        raise HFInteropError(f"{where}: {msg}; this framework's model cannot represent it exactly")

    model_type = hf.get("model_type")
    if model_type not in LLAMA_FAMILY:
        bad(f"model_type={model_type!r} is not one of {LLAMA_FAMILY}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise HFInteropError(f"{where}: missing or non-integer {key}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            bad(f"{key}={hf[key]} (this model has no biases)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        bad(f"hidden_act={act!r} (the MLP is SwiGLU with SiLU)")
    if hf.get("rope_scaling"):
        bad(f"rope_scaling={hf['rope_scaling']!r} (only plain RoPE is supported)")
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        bad(f"rope_parameters.rope_type={rope_type!r} (only plain RoPE is supported)")
    extra = set(params) - {"rope_type", "type", "rope_theta"}
    if extra:
        bad(f"rope_parameters has {sorted(extra)} (only plain RoPE with rope_theta is supported)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        bad(f"partial_rotary_factor={hf['partial_rotary_factor']} (rotary covers the whole head)")
    n_heads = hf["num_attention_heads"]
    if hf["hidden_size"] % n_heads:
        bad(f"hidden_size={hf['hidden_size']} is not divisible by num_attention_heads={n_heads}")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim != hf["hidden_size"] // n_heads:
        bad(f"head_dim={head_dim} differs from hidden_size / num_attention_heads = {hf['hidden_size'] // n_heads}")
    window = hf.get("sliding_window")
    if window is not None and window < hf.get("max_position_embeddings", 2048):
        bad(f"sliding_window={window} (attention here is full causal)")


def model_config_from_hf(path_or_config: str | Path | dict, *, n_future: Optional[int] = None,
                         head_layers: Optional[int] = None, **overrides) -> ModelConfig:
    """A ModelConfig matching a Hugging Face Llama checkpoint (a directory or its config dict).

    The Llama's last ``head_layers`` (default 1) layers become head 1; ``n_future`` defaults to 1.
    For a directory exported by :func:`export_hf` the recorded multi-token config is the default
    instead (same n_future, head type, head depth, ...). ``overrides`` set other fields (e.g.
    ``match_baseline_params``, ``head_type``, ``max_seq_len`` no larger than the checkpoint's)."""
    side = None
    if isinstance(path_or_config, dict):
        hf = path_or_config
        check_hf_config(hf)
    else:
        hf = read_hf_config(path_or_config)
        if (Path(path_or_config) / SIDE_CONFIG).is_file():
            side = _read_side_config(Path(path_or_config))["model"]
    if side is not None:
        base = dict(side)
        if n_future is not None:
            base["n_future"] = n_future
        if head_layers is not None:
            base["head_layers"] = head_layers
        base.update(overrides)
    else:
        base = {"name": hf.get("_name_or_path") or "hf", "n_future": n_future or 1,
                "head_layers": head_layers or 1, **overrides}
    n_future, head_layers = base["n_future"], base["head_layers"]
    total = hf["num_hidden_layers"]
    if total <= head_layers:
        raise HFInteropError(f"num_hidden_layers={total} leaves no trunk layers with head_layers={head_layers}")
    n_layers = total - head_layers
    if base.get("match_baseline_params"):
        n_layers += (n_future - 1) * head_layers  # trunk_layers = n_layers - (n_future - 1) * head_layers
    base.update(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers, n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=hf_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
    base.setdefault("max_seq_len", hf.get("max_position_embeddings", 2048))
    base.setdefault("init_std", float(hf.get("initializer_range", 0.02)))
    return ModelConfig(**base)


def hydra_overrides_from_hf(path: str | Path, **kwargs) -> list[str]:
    """``model.<field>=<value>`` overrides for mtp-train that build the model of a checkpoint."""
    cfg = model_config_from_hf(path, **kwargs)
    return [f"model.{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in asdict(cfg).items()]


def check_compatible(cfg: ModelConfig, hf: dict[str, Any], where: str) -> None:
    """Raise HFInteropError naming the first ModelConfig field that disagrees with the checkpoint."""
    if cfg.head_type == "linear":
        raise HFInteropError(
            f"init_from_hf {where}: model.head_type='linear' cannot hold a Llama's next-token path "
            f"(head 1 must be transformer blocks); use head_type transformer or causal")
    expected = {
        "vocab_size": ("vocab_size", hf["vocab_size"]),
        "dim": ("hidden_size", hf["hidden_size"]),
        "n_heads": ("num_attention_heads", hf["num_attention_heads"]),
        "n_kv_heads": ("num_key_value_heads", hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        "ffn_dim": ("intermediate_size", hf["intermediate_size"]),
        "tie_embeddings": ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False))),
        "rope_theta": ("rope_theta", hf_rope_theta(hf)),
        "norm_eps": ("rms_norm_eps", float(hf.get("rms_norm_eps", 1e-6))),
    }
    for field, (hf_key, value) in expected.items():
        if getattr(cfg, field) != value:
            raise HFInteropError(f"init_from_hf {where}: model.{field}={getattr(cfg, field)!r} but the checkpoint's "
                                 f"{hf_key}={value!r} (build the model config with "
                                 f"mtp_pretrain.interop.hf.model_config_from_hf)")
    total = hf["num_hidden_layers"]
    if cfg.trunk_layers + cfg.head_layers != total:
        raise HFInteropError(
            f"init_from_hf {where}: the checkpoint has num_hidden_layers={total} but this model's next-token path "
            f"has trunk_layers + head_layers = {cfg.trunk_layers} + {cfg.head_layers}; set model.n_layers="
            f"{total - cfg.head_layers + (cfg.n_future - 1) * cfg.head_layers * cfg.match_baseline_params}")
    max_pos = hf.get("max_position_embeddings", 2048)
    if cfg.max_seq_len > max_pos:
        raise HFInteropError(f"init_from_hf {where}: model.max_seq_len={cfg.max_seq_len} exceeds the checkpoint's "
                             f"max_position_embeddings={max_pos}")


def read_hf_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory: model.safetensors, or the shards named
    by model.safetensors.index.json."""
    path = Path(path)
    if (path / HF_INDEX).is_file():
        weight_map = json.loads((path / HF_INDEX).read_text())["weight_map"]
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            with safe_open(str(path / shard), framework="pt") as f:
                for k in f.keys():
                    if weight_map.get(k) == shard:
                        sd[k] = f.get_tensor(k)
        missing = set(weight_map) - set(sd)
        if missing:
            raise HFInteropError(f"{path}: {HF_INDEX} names tensors its shards lack: {sorted(missing)[:5]}")
        return sd
    if (path / HF_WEIGHTS).is_file():
        return load_file(path / HF_WEIGHTS)
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    raise HFInteropError(f"{path}: no {HF_WEIGHTS} or {HF_INDEX}"
                         + (f" (found {found}; re-save with save_pretrained(..., safe_serialization=True))" if found else ""))


def _read_side_config(path: Path) -> dict[str, Any]:
    side = json.loads((path / SIDE_CONFIG).read_text())
    if side.get("format") != SIDE_FORMAT or side.get("version") != SIDE_VERSION:
        raise HFInteropError(f"{path / SIDE_CONFIG}: not a {SIDE_FORMAT} v{SIDE_VERSION} side file "
                             f"(format={side.get('format')!r}, version={side.get('version')!r})")
    return side


def next_token_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Llama state dict -> our names for the embedding, trunk, head 1 and unembedding."""
    names = llama_name_map(cfg)
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}  # old saves
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)  # some savers store the tied copy too
    wanted = set(names.values())
    unknown = sorted(set(hf_sd) - wanted)
    if unknown:
        raise HFInteropError(f"init_from_hf {where}: the checkpoint has weights with no place in this model "
                             f"(biases or another architecture?): {unknown[:5]}")
    missing = sorted(wanted - set(hf_sd))
    if missing:
        raise HFInteropError(f"init_from_hf {where}: the checkpoint lacks {missing[:5]}")
    out = {ours: hf_sd[hf] for ours, hf in names.items()}
    if cfg.tie_embeddings:
        out["unembed.weight"] = out["tok_embeddings.weight"]
    return out


def load_hf_weights(model: MTPTransformer, path: str | Path, extra_heads: str = "copy",
                    log: Callable[[str], None] = print) -> None:
    """Initialise ``model`` from a local Hugging Face Llama directory (see the module docstring):
    trunk + head 1 + embedding + unembedding exactly; heads 2..n from the directory's side file
    when it has one, else (and beyond the side file's heads) by ``extra_heads`` (copy | fresh).
    The tensors, renamed to ours, are loaded by the checkpoint reader's partial loading, as
    ``train.init_from`` loads a checkpoint with another number of heads."""
    if extra_heads not in EXTRA_HEAD_RULES:
        raise ValueError(f"extra_heads must be one of {EXTRA_HEAD_RULES}, got {extra_heads!r}")
    path = Path(path)
    cfg = model.cfg
    hf = read_hf_config(path)
    check_compatible(cfg, hf, str(path))
    sd = next_token_state_dict(read_hf_state_dict(path), cfg, str(path))
    n = cfg.n_future
    n_side = 1
    if n > 1 and (path / SIDE_CONFIG).is_file():
        side_cfg = _read_side_config(path)
        src = side_cfg["model"]
        if side_cfg.get("extra_heads") and side_cfg.get("extra_heads_file"):
            if (src["head_type"], src["head_layers"]) != (cfg.head_type, cfg.head_layers):
                raise HFInteropError(
                    f"init_from_hf {path}: its extra heads are head_type={src['head_type']!r} head_layers="
                    f"{src['head_layers']}, this model has model.head_type={cfg.head_type!r} model.head_layers="
                    f"{cfg.head_layers}")
            sd.update(load_file(path / side_cfg["extra_heads_file"]))
            n_side = min(n, src["n_future"])
    if extra_heads == "copy":
        head1 = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("heads.0.")}
        for i in range(n_side, n):
            for rest, v in head1.items():
                sd[f"heads.{i}.{rest}"] = v.clone()
    load_partial_state_dict(model, sd, complete_heads=n_side, where=f"init_from_hf {path}", error=HFInteropError)
    if cfg.tie_embeddings:
        assert model.unembed.weight is model.tok_embeddings.weight
    msg = f"initialised from Hugging Face checkpoint {path}: embedding, trunk, head 1, unembedding"
    if n_side > 1:
        msg += f"; heads 2..{n_side} from {SIDE_WEIGHTS}"
    if n > n_side:
        rule = ("copies of head 1" + (" (fusion projections and input norms fresh)" if cfg.head_type == "causal" else "")
                if extra_heads == "copy" else "freshly initialised")
        msg += f"; heads {n_side + 1}..{n} {rule}"
    log(msg)


def load_hf_model(path: str | Path, extra_heads: str = "copy", **config_overrides) -> MTPTransformer:
    """The whole multi-token model from a Hugging Face directory (an :func:`export_hf` export is
    rebuilt exactly; a plain Llama gets heads per ``extra_heads``), in eval mode."""
    cfg = model_config_from_hf(path, **config_overrides)
    model = MTPTransformer(cfg)
    load_hf_weights(model, path, extra_heads=extra_heads, log=lambda _: None)
    return model.eval()


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mtp_pretrain.interop.hf",
                                 description="Print mtp-train model overrides matching a Hugging Face checkpoint.")
    ap.add_argument("command", choices=("overrides",))
    ap.add_argument("path")
    ap.add_argument("--n-future", type=int)
    ap.add_argument("--head-layers", type=int)
    args = ap.parse_args(argv)
    print(" ".join(hydra_overrides_from_hf(args.path, n_future=args.n_future, head_layers=args.head_layers)))


if __name__ == "__main__":
    main()
