"""Build the model on the meta device, shard it, then give each rank storage for its own shards only.

    with torch.device("meta"): model = MTPTransformer(cfg)     # shapes only, no storage
    model = strategy.parallelize(model)                          # fully_shard / parallelize_module / ...
    strategy.materialize(model, seed, log)                       # storage + per-shard init

``materialize`` initialises one parameter at a time: its full value comes from
``model/init.py`` (a function of ``train.seed`` and the parameter's name -- for a tied parameter
held under another name, the name the whole model gives it: ``initialisation_names``), and the
rank keeps its part of it. Where that part lives is the strategy's ``Shards``:

* fsdp, tp, fsdp_tp: the DTensor placement (``distribute_tensor(..., src_data_rank=None)``:
  every rank cuts its own slice from its own copy, no communication);
* megatron: ``megatron.MegatronShards``, the TP slice ``shard_of`` gives the megatron layer
  (``convert_model`` builds the layers' shard-sized storage; the plain modules left stay on meta
  until ``allocate``);
* deepspeed ZeRO-3: ``zero.ZeroPartitions``, the flat partition ``p.ds_tensor``; the meta
  parameters become ZeRO parameters in ``zero.partition_initial_values`` (what
  ``deepspeed.zero.Init`` does to each parameter, without its broadcast from rank 0);
* pipeline stages (any strategy that takes them): each rank builds only the modules of its own
  stages (``Pipeline.split`` runs on meta), then the above.

Peak memory is the rank's shards plus the largest single parameter, never the whole model, and
the weights are exactly those of a one-process run (``tests/test_meta_init.py``).

``train.init_from`` then reads into the shards: a DCP checkpoint through DCP itself into DTensors
(each rank reads the byte ranges of its own slices), one full parameter at a time for megatron's
and ZeRO-3's layouts; a single-file export one tensor at a time.

``builds_on_meta`` is the one place deciding which jobs build on meta (``parallel.meta_init``,
default on): fsdp, tp, fsdp_tp, megatron, deepspeed at zero_stage 3, and ``parallel.pp_size > 1``.
The others build the whole model on the host with the same per-parameter rule: ddp and none
hold full replicas anyway, ZeRO-1/2 keep the full parameters on every rank (only gradients and
optimizer state are partitioned). ``train.init_from_hf`` also builds on the host (the Hugging Face
reader maps the whole state dict at once). See docs/parallelism.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from mtp_pretrain.model import MTPTransformer
from mtp_pretrain.model.init import initial_value

# Strategies whose parameters are sharded (deepspeed: only at zero_stage 3, the stage that partitions
# the parameters themselves), and pipeline stages under any strategy: each rank materialises its own.
META_STRATEGIES = ("fsdp", "tp", "fsdp_tp", "megatron", "deepspeed")


def builds_on_meta(cfg) -> bool:
    """Whether the Trainer builds the model on the meta device for this ``ParallelConfig``."""
    if not cfg.meta_init:
        return False
    if cfg.pp_size > 1:
        return True
    if cfg.strategy == "deepspeed":
        return cfg.zero_stage == 3  # ZeRO-1/2 keep the full parameters on every rank anyway
    return cfg.strategy in META_STRATEGIES


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``, except for a model on the meta device: ``materialize`` gives it
    storage after sharding."""
    return model if is_meta(model) else model.to(device)


def when_materialized(model: nn.Module, fn: Callable[[], object]) -> None:
    """Run ``fn`` now, or at the end of ``materialize`` while ``model`` is on the meta device
    (what a strategy must do once parameters have storage, e.g. FSDP's first forward)."""
    if is_meta(model):
        model.__dict__.setdefault("_when_materialized", []).append(fn)
    else:
        fn()


class Shards:
    """Where a rank keeps its part of each parameter, for ``materialize`` and ``load_into_shards``:
    the parameter's global shape, this rank's part of a full value, and the tensor that holds it.
    This default reads DTensor placements (fsdp, tp, fsdp_tp) and treats any other parameter as
    whole; ``megatron`` (its TP layout) and ZeRO-3 (its flat partitions) bring their own."""

    def global_shape(self, name: str, param: torch.Tensor) -> torch.Size:
        return param.shape

    def local_part(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``full`` (the parameter's global value) in the layout of ``param``."""
        if isinstance(param, DTensor):
            return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                                     src_data_rank=None).to_local()
        return full

    def storage(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return param.to_local() if isinstance(param, DTensor) else param

    def copy_into(self, name: str, param: torch.Tensor, full: torch.Tensor) -> None:
        target = self.storage(name, param)
        local = self.local_part(name, param, full)
        if target.shape != local.shape:
            raise RuntimeError(f"{name}: local shard shape {tuple(target.shape)} != slice {tuple(local.shape)}")
        target.copy_(local.to(target.dtype))


class Progress:
    """A line every ``every_s`` seconds on the main rank: parameters done, rate, ETA."""

    def __init__(self, what: str, total: int, log: Optional[Callable[[str], None]], every_s: float = 10.0):
        self.what, self.total, self.log, self.every_s = what, total, log, every_s
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def add(self, numel: int) -> None:
        self.done += numel
        now = time.perf_counter()
        if self.log is not None and now - self.last >= self.every_s:
            rate = self.done / (now - self.t0)
            self.log(f"{self.what}: {self.done / 1e6:.0f}M / {self.total / 1e6:.0f}M parameters, "
                     f"{rate / 1e6:.1f}M/s, ETA {(self.total - self.done) / max(rate, 1):.0f}s")
            self.last = now


def parameter_places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """{id(parameter): the (module, attribute) pairs holding it}: more than one for a tied or
    shared parameter."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((module, name))
    return places


def _shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter registered in more than one place (tied embeddings, shared heads), as the
    (module, attribute) pairs holding it."""
    return [group for group in parameter_places(model).values() if len(group) > 1]


def _retie(shared: list[list[tuple[nn.Module, str]]]) -> None:
    """``to_empty`` gives each module a new Parameter of its own (a meta tensor cannot change its
    device in place), which unties shared ones: point every place back at the first one's."""
    for (owner, name), *others in shared:
        first = owner._parameters[name]
        for module, attr in others:
            if module._parameters[attr] is not first:
                setattr(module, attr, first)


def initialisation_names(cfg) -> dict[str, str]:
    """{name: the name the whole model initialises it under}, for every parameter name of the
    whole ``MTPTransformer(cfg)``. A tied or shared parameter takes its value from its first
    name (``model/init.py``): a model that holds it only under another name -- the last
    pipeline stage's tied ``unembed.weight``, which is ``tok_embeddings.weight`` -- must still
    draw it from that one."""
    with torch.device("meta"):
        whole = MTPTransformer(cfg)
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in whole.named_parameters(remove_duplicate=False)}


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int,
                log: Optional[Callable[[str], None]] = None, shards: Optional[Shards] = None) -> nn.Module:
    """Give a (possibly sharded) meta-device ``MTPTransformer`` storage on ``device`` and
    initialise each rank's shards (``shards``: where they are; default: DTensor placements) to
    exactly what ``MTPTransformer(cfg, init_seed=seed)`` holds."""
    shards = shards or Shards()
    allocate(model, device)
    params = list(model.named_parameters())  # a tied / shared parameter once, under its first name
    init_name = initialisation_names(model.cfg)
    progress = Progress("initialising", sum(shards.global_shape(n, p).numel() for n, p in params), log)
    for name, p in params:
        shape = shards.global_shape(name, p)
        full = initial_value(model.cfg, init_name[name], shape, seed)
        shards.copy_into(name, p, full)
        del full
        progress.add(shape.numel())
    run_deferred(model)
    return model


def allocate(model: nn.Module, device: torch.device) -> None:
    """Storage (uninitialised) for a meta-device model's parameters and shards, shared parameters
    tied again, buffers computed."""
    shared = _shared_parameters(model)
    model.to_empty(device=device)
    _retie(shared)
    model.init_buffers()


def allocate_buffers(model: nn.Module, device: torch.device) -> None:
    """Storage for a meta-device model's buffers only (the RoPE tables), computed."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)
    model.init_buffers()


def run_deferred(model: nn.Module) -> None:
    """What strategies deferred with ``when_materialized`` (the model has storage now)."""
    for fn in model.__dict__.pop("_when_materialized", []):
        fn()


# --- init_from: read into the shards --------------------------------------------------------------
@torch.no_grad()
def load_into_shards(model: nn.Module, path: str | Path, log: Callable[[str], None] = print,
                     shards: Optional[Shards] = None) -> None:
    """``train.init_from`` for a sharded model: the same rules as ``checkpoint_reader.load_model_weights``
    (heads the source lacks keep their initialisation, the source's extra heads are dropped,
    shapes must agree), without a full copy of the model on any rank. ``shards``: where each
    rank's part of a parameter lives (default: DTensor placements); a DCP checkpoint goes through
    DCP's own resharding only for DTensors, other layouts read one full tensor at a time."""
    shards = shards or Shards()
    from mtp_pretrain.checkpoint_reader import WEIGHTS_FILE, head_index, read_model_config, resolve_checkpoint

    path = resolve_checkpoint(path)
    src_cfg = read_model_config(path)
    n_src, n_dst = src_cfg.n_future, model.cfg.n_future
    params = dict(model.named_parameters())
    if (path / WEIGHTS_FILE).is_file():
        source_shapes = _export_shapes(path / WEIGHTS_FILE, src_cfg)
    else:
        source_shapes = _dcp_shapes(path)
    kept = {k: s for k, s in source_shapes.items() if head_index(k) is None or head_index(k) < n_dst}
    for k, shape in kept.items():
        if k not in params and not (src_cfg.tie_embeddings and k == "unembed.weight"):
            raise ValueError(f"init_from {path}: parameter {k} has no counterpart in this model "
                             f"(head_type {src_cfg.head_type} vs {model.cfg.head_type}?)")
        here = tuple(shards.global_shape(k, params[k])) if k in params else None
        if here is not None and here != tuple(shape):
            raise ValueError(f"init_from {path}: {k} has shape {tuple(shape)} there, {here} here")
    complete_heads = min(n_src, n_dst)  # as checkpoint_reader.load_partial_state_dict requires
    missing = [k for k in params if k not in kept and (head_index(k) is None or head_index(k) < complete_heads)]
    if missing:
        raise ValueError(f"init_from {path}: missing parameters {missing[:5]}")
    wanted = [k for k in params if k in kept]
    if (path / WEIGHTS_FILE).is_file():
        _read_export(path / WEIGHTS_FILE, wanted, params, shards)
    elif type(shards) is Shards:
        _read_dcp(path, wanted, params)
    else:
        _read_dcp_one_at_a_time(path, wanted, params, shards)
    log(f"initialised from {path} into the shards: trunk + heads 1..{min(n_src, n_dst)} copied"
        + (f"; heads {n_src + 1}..{n_dst} freshly initialised" if n_dst > n_src else "")
        + (f"; source heads {n_dst + 1}..{n_src} dropped" if n_src > n_dst else ""))


def _export_shapes(file: Path, src_cfg) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if src_cfg.tie_embeddings and "tok_embeddings.weight" in shapes:
        shapes["unembed.weight"] = shapes["tok_embeddings.weight"]
    return shapes


def _read_export(file: Path, names: Iterable[str], params: dict, shards: Shards) -> None:
    """One tensor at a time from the safetensors file, each rank keeping its slice."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        stored = set(f.keys())
        for name in names:
            key = name if name in stored else "tok_embeddings.weight"  # a tied unembedding is stored once
            full = f.get_tensor(key).to(torch.float32)
            shards.copy_into(name, params[name], full)


def _dcp_shapes(path: Path) -> dict[str, tuple]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefix = "model."
    return {k[len(prefix):]: tuple(m.size) for k, m in meta.items()
            if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}


def _read_dcp(path: Path, names: Iterable[str], params: dict) -> None:
    """DCP reads each rank's slices straight into the (DTensor) parameters."""
    from mtp_pretrain.checkpoint_reader import load_dcp

    load_dcp(path, {"model": {name: params[name] for name in names}})


def _read_dcp_one_at_a_time(path: Path, names: Iterable[str], params: dict, shards: Shards) -> None:
    """A layout DCP cannot reshard into (megatron's plain shards, ZeRO-3's flat partitions): each
    parameter's full value read on its own (one DCP load per parameter, collective), then this
    rank keeps its part: peak = the largest parameter."""
    from mtp_pretrain.checkpoint_reader import load_dcp

    for name in names:
        full = torch.empty(tuple(shards.global_shape(name, params[name])), dtype=torch.float32)
        load_dcp(path, {"model": {name: full}})
        shards.copy_into(name, params[name], full)


def build_model(cfg, strategy, device: torch.device, log: Callable[[str], None],
                before_parallelize: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """The Trainer's model: built, parallelised by ``strategy`` and initialised (``train.seed``,
    then ``train.init_from`` / ``train.init_from_hf``), on the meta device where the strategy shards
    parameters (``builds_on_meta``), else on the host. ``before_parallelize`` gets the plain model
    (on meta or not) before the strategy wraps it: what must hold before sharding (frozen
    parameters) goes there."""
    on_meta = builds_on_meta(cfg.parallel) and not cfg.train.init_from_hf
    t0 = time.perf_counter()
    if on_meta:
        with torch.device("meta"):
            model = MTPTransformer(cfg.model)
    else:
        model = MTPTransformer(cfg.model, init_seed=cfg.train.seed)
        _load_on_host(model, cfg, log)
    if before_parallelize is not None:
        before_parallelize(model)
    model = strategy.parallelize(model)
    if on_meta:
        strategy.materialize(model, cfg.train.seed, log)
        if cfg.train.init_from:
            load_into_shards(model, cfg.train.init_from, log=log, shards=strategy.shards(model))
    log(f"model built {'on the meta device, sharded, then materialised' if on_meta else 'on the host'} "
        f"in {time.perf_counter() - t0:.1f}s")
    return model


def _load_on_host(model: MTPTransformer, cfg, log: Callable[[str], None]) -> None:
    if cfg.train.init_from:
        from mtp_pretrain.checkpoint_reader import load_model_weights

        load_model_weights(model, cfg.train.init_from, log=log)
    if cfg.train.init_from_hf:
        from mtp_pretrain.interop.hf import load_hf_weights

        load_hf_weights(model, cfg.train.init_from_hf, extra_heads=cfg.train.init_from_hf_heads, log=log)
