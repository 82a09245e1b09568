"""``mtp-plan``: will this job fit, per rank, on N GPUs? Answered on this machine before queueing.

    mtp-plan model=7b parallel=fsdp parallel.activation_checkpointing=full loss.chunk_size=4096 \\
        data.seq_len=4096 train.micro_batch_size=1 --world-size 16 --device h100-80gb --compare

How. The job's own code runs one training step -- the model of ``cfg.model``, the strategy's
``parallelize``, ``Trainer.train_step`` (the loss, gradient-sync hooks, clipping, the AdamW
step) -- under ``FakeTensorMode`` (tensors with shapes, dtypes and storages but no data) with a
fake process group of ``--world-size`` ranks (``init_process_group("fake")``: collectives
return at once). The run is rank 0's; every data-parallel rank holds the same shapes. A
dispatch mode (``LiveStorageBytes``) counts the bytes of every live tensor storage, op by op,
the way CUDA's caching allocator counts ``memory_allocated``; its maximum is the prediction of
``torch.cuda.max_memory_allocated``. At the peak the live storages are split into parameters
(sharded and all-gathered), gradients, optimizer state, logits (tensors whose last dimension is
the vocabulary: logits, probabilities and their gradients) and activations (everything else
the step allocates: saved activations, their gradients, communication buffers, the batch).

Pipeline parallelism (``parallel.pp_size > 1``, strategies none and fsdp; every schedule) runs
the real stage code too: the job's ``torch.distributed.pipelining`` schedule with all of the
step's micro-batches, once per pp rank (``plan_job``; as the first global rank of that pp rank),
so each rank's in-flight activations (all micro-batches under gpipe, up to pp_size - s on stage s
under 1f1b), receive buffers, the last stage's heads, unembedding and logits, and FSDP's deferred
gradient reduction across micro-batches are what that rank's schedule allocates. The fake process
group carries no data between stages, so the stages get their boundary tensors' shapes up front
(the schedule's static mode, ``Pipeline.example_tensors``), from one no-gradient forward of the
rank's first stage during set-up. The plan reports the worst pp rank and every pp rank.
With tensor parallelism (tp, fsdp_tp) a stage boundary carries local shards: refused.

On a GPU the job runs in bf16 autocast (``train.dtype=auto``) with FSDP's bf16 parameter
all-gather and torch's default multi-tensor (foreach) AdamW; the fake step does the same (its
fake tensors are CPU tensors, so under CPU autocast: bf16 matmuls as on a GPU).

What the fake run cannot see, added as a stated margin (``RESERVED_GIB`` + ``FRAGMENTATION``):
the CUDA context and kernels (~0.5-1 GiB), NCCL's communicator buffers (~0.5-1 GiB for a few
communicators), and the caching allocator's rounding and fragmentation (``memory_reserved`` is
typically 5-15 % above ``max_memory_allocated``). Also outside the count: kernels' private
workspaces (cuBLAS, ~tens of MiB) and the choice of attention kernel. Attention runs the
fake CPU kernel, which keeps no seq x seq matrix, as flash / memory-efficient attention on a
GPU do; with ``data.document_masking`` the GPU's memory-efficient kernel also keeps the
[B, 1, T, T] mask as an additive bias per layer, which the plan adds analytically
(``mask_bias_bytes``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from mtp_pretrain.config import JobConfig
from mtp_pretrain.head_schedule import HeadWeights
from mtp_pretrain.model import MTPTransformer
from mtp_pretrain.optim import build_adamw, build_scheduler, init_adamw_state
from mtp_pretrain.parallel import build_strategy
from mtp_pretrain.parallel.materialize import allocate, is_meta, run_deferred
from mtp_pretrain.train import Trainer, freeze_next_token_path

GiB = 2 ** 30
MiB = 2 ** 20
RESERVED_GIB = 2.0  # CUDA context + NCCL buffers + cuBLAS workspaces, per rank
FRAGMENTATION = 0.10  # the caching allocator's reserved memory above what tensors hold


@dataclass(frozen=True)
class GPUType:
    memory_gib: float  # total device memory as nvidia-smi reports it
    peak_bf16_flops: float  # dense, no sparsity


GPU_TYPES = {
    "h100-80gb": GPUType(81559 / 1024, 989e12),
    "h100-94gb": GPUType(95830 / 1024, 989e12),
    "h200": GPUType(143771 / 1024, 989e12),
    "a100-80gb": GPUType(81920 / 1024, 312e12),
    "a100-40gb": GPUType(40960 / 1024, 312e12),
    "l40s": GPUType(46068 / 1024, 362e12),
}

# Strategies whose step runs under fake tensors. DeepSpeed's and megatron's engines allocate
# and communicate through their own runtimes, which the fake process group cannot stand in for.
PLANNABLE = ("none", "ddp", "fsdp", "tp", "fsdp_tp")
PLANNABLE_WITH_PIPELINE = ("none", "fsdp")  # parallel.pp_size > 1
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "logits")


# Kernels that allocate a temporary the fake kernel does not: ATen's logsumexp (on every device)
# computes exp(x - max) into an input-sized tensor before summing it.
KERNEL_SCRATCH = {torch.ops.aten.logsumexp.default: lambda x: x.numel() * x.element_size()}


# --- counting live storage bytes --------------------------------------------------------------
class LiveStorageBytes(TorchDispatchMode):
    """Sums the bytes of live tensor storages as ops create and free them; keeps the peak and,
    at the peak, what the live bytes were (via ``classify``).

    A storage is counted from the op that first returns it until it is freed (a weak reference
    fires), at its current size: FSDP2 frees and re-allocates its all-gathered parameters by
    ``UntypedStorage.resize_``, which no dispatch mode sees, so that method is wrapped while
    the mode is active. ``counted`` selects tensors (fake ones when planning). The peak total
    is exact; its split is taken whenever the peak has risen by more than ``resolution`` since
    the last split (0.2 %: classifying at every new byte would dominate the run).
    """

    def __init__(self, vocab_sizes: tuple[int, ...] = (), counted: Callable[[torch.Tensor], bool] = lambda t: True,
                 classify: Optional[Callable[[dict, dict], dict]] = None, resolution: float = 2e-3):
        super().__init__()
        self.vocab_sizes, self.counted, self.classify = set(vocab_sizes), counted, classify
        self.resolution = resolution
        self.live: dict[int, list] = {}  # id(storage) -> [nbytes, tag, weakref]
        self.by_tag: dict[str, int] = {}
        self.total = self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self._classified_at = 0
        self.tag = "other"  # what allocations are now: set by the caller around phases
        self.scratch: dict[str, int] = {}  # a kernel's temporary while it runs (KERNEL_SCRATCH)
        self._orig_resize = None

    # storages
    def _add(self, st: torch.UntypedStorage, tag: str) -> None:
        key = id(st)
        if key in self.live:
            return
        nbytes = st.nbytes()
        self.live[key] = [nbytes, tag, weakref.ref(st, lambda _, k=key: self._free(k))]
        self._change(tag, nbytes)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self._change(entry[1], -entry[0])

    def _change(self, tag: str, delta: int) -> None:
        self.total += delta
        self.by_tag[tag] = self.by_tag.get(tag, 0) + delta
        if self.total > self.peak:
            self.peak = self.total
            if self.classify is not None and self.total > self._classified_at * (1 + self.resolution):
                self._classified_at = self.total
                self.peak_breakdown = self.classify(self.live, self.by_tag)
                for tag, nbytes in self.scratch.items():  # not in self.live
                    key = tag if tag in self.peak_breakdown else "activations"
                    self.peak_breakdown[key] = self.peak_breakdown.get(key, 0) + nbytes

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak = self._classified_at = self.total
        self.peak_breakdown = self.classify(self.live, self.by_tag) if self.classify is not None else {}

    def watch(self, t: torch.Tensor, tag: Optional[str] = None) -> None:
        """Count ``t``'s storage(s) now (tensors that exist before the mode is entered)."""
        for leaf in _plain_tensors(t):
            if self.counted(leaf):
                self._add(leaf.untyped_storage(), tag or self._tag_of(leaf))

    def _tag_of(self, t: torch.Tensor) -> str:
        if t.dim() >= 2 and t.shape[-1] in self.vocab_sizes:
            return "logits"
        return self.tag

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors_in(out):
            self.watch(t)
        if func in KERNEL_SCRATCH and self.counted(args[0]):
            # Allocated and freed inside the kernel: counted for the moment the op runs.
            scratch, tag = KERNEL_SCRATCH[func](args[0]), self._tag_of(args[0])
            self.scratch = {tag: scratch}
            self._change(tag, scratch)
            self.scratch = {}
            self._change(tag, -scratch)
        return out

    # resize_ of a storage: FSDP2's free / re-allocate of unsharded parameters
    def __enter__(self):
        self._orig_resize = orig = torch.UntypedStorage.resize_
        mode = self

        def resize_(st, size):
            entry = mode.live.get(id(st))
            out = orig(st, size)
            if entry is not None:
                new = st.nbytes()
                delta, entry[0] = new - entry[0], new
                mode._change(entry[1], delta)
            return out

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._orig_resize
        return super().__exit__(*exc)


def _tensors_in(x) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs: a tensor, or (nested) lists and tuples of
    them (what aten ops take and return; a generic pytree walk per op costs a tenth of a plan)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors_in(item)]
    return []


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside ``t`` (a DTensor's local shard, say)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    out, todo = [], [t]
    while todo:
        x = todo.pop()
        if is_traceable_wrapper_subclass(x):
            attrs, _ = x.__tensor_flatten__()
            todo.extend(getattr(x, a) for a in attrs if isinstance(getattr(x, a), torch.Tensor))
        else:
            out.append(x)
    return out


def _storage_ids(tensors) -> set[int]:
    return {id(leaf.untyped_storage()) for t in tensors if t is not None for leaf in _plain_tensors(t)}


class FakeScalars(TorchDispatchMode):
    """Above FakeTensorMode: lets the job's Python code run on tensors without data.

    * A Python number read from a fake tensor (``float(loss)``, ``int(count)``, a norm) gets a
      placeholder (1): only memory is planned, and no shape in a step depends on such a value.
    * An op whose tensor inputs are all real (device-mesh bookkeeping, constants) runs for real.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return 1.0 if args[0].dtype.is_floating_point else 1
        tensors = _tensors_in(args) + (_tensors_in(list(kwargs.values())) if kwargs else [])
        if tensors and not any(isinstance(t, FakeTensor) or t.is_meta for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


# --- one step of the job ----------------------------------------------------------------------
@dataclass
class StepMemory:
    """Per-rank memory of one training step (bytes)."""

    peak: int
    breakdown: dict  # category -> bytes at the peak
    before_step: int  # live after set-up: parameters + optimizer state (+ anything kept)
    # Set-up: the strategy's parallelize moves the whole host-built model to the device before
    # sharding it (what the job does today; meta-device initialisation removes this peak).
    set_up_peak: int = 0
    mask_bias_bytes: int = 0  # analytic: see the module docstring
    micro_batch_size: int = 0
    micro_batches: int = 1
    seconds: float = 0.0
    # Pipeline parallelism: the pp rank this step is (its stages' indices), and, on the plan of a
    # whole job (``plan_job``), every pp rank's own StepMemory, first to last; this one is the worst.
    pp_rank: int = 0
    pipeline_stages: tuple[int, ...] = ()
    stages: list["StepMemory"] = field(default_factory=list)

    @property
    def predicted(self) -> int:
        """What max_memory_allocated should report."""
        return self.peak + self.mask_bias_bytes


@dataclass(frozen=True)
class Emulation:
    """How the planned device runs the job."""

    amp_dtype: Optional[torch.dtype]  # autocast dtype; None = float32
    foreach: bool  # multi-tensor AdamW (torch's default on CUDA)
    cuda: bool  # GPU kernels (see mask_bias_bytes)

    @classmethod
    def for_device(cls, cfg: JobConfig, device: str) -> "Emulation":
        if device == "cpu":
            return cls(torch.bfloat16 if cfg.train.dtype == "bfloat16" else None, foreach=False, cuda=False)
        return cls(None if cfg.train.dtype == "float32" else torch.bfloat16, foreach=True, cuda=True)


def _random_batches(cfg: JobConfig, device: torch.device) -> Iterator[torch.Tensor]:
    shape = (cfg.train.micro_batch_size, cfg.data.seq_len + cfg.model.n_future)
    while True:
        yield torch.randint(0, cfg.model.vocab_size, shape, device=device)


class StepOnlyTrainer(Trainer):
    """A Trainer whose set-up builds only what ``train_step`` (inherited: the job's own step)
    touches -- strategy, model, optimizer, schedule -- and feeds it random token batches: no
    data files, checkpoints or logging. ``fake``: the model is built on the meta device and
    materialised by the strategy's ``parallelize`` under the caller's FakeTensorMode."""

    def __init__(self, cfg: JobConfig, env, emulation: Emulation, micro_batches: Optional[int] = None,
                 fake: bool = True):
        self.cfg, self.env, self.amp_dtype, self.emulation, self.fake = cfg, env, emulation.amp_dtype, emulation, fake
        self.strategy = build_strategy(cfg.parallel, env, self.amp_dtype)
        self.strategy.validate(cfg.model, seq_len=cfg.data.seq_len)
        self.seq_len = cfg.data.seq_len
        per_micro = cfg.train.micro_batch_size * self.seq_len * self.strategy.dp_size
        accum = max(1, (cfg.train.global_batch_tokens or per_micro) // per_micro)
        # A pipeline schedule's memory depends on how many micro-batches are in flight: run all of
        # the job's; otherwise a third micro-batch repeats the second's memory.
        self.grad_accum = micro_batches or (accum if cfg.parallel.pp_size > 1 else min(2, accum))
        self.pad_id = None
        # Document masking: the same code path (masks, per-document positions) on random ids.
        self.document_end_id = 0 if cfg.data.document_masking else None
        self.head_weights = HeadWeights(cfg.loss, cfg.model.n_future, cfg.train.max_steps)
        self.step, self.tokens_seen, self.nonfinite_in_a_row, self.nonfinite_total = 0, 0, 0, 0
        if fake:
            _build_meshes_now(self.strategy)

    def build_model(self) -> MTPTransformer:
        """The plain model: on the meta device when fake (outside FakeTensorMode; ``set_up`` gives
        it fake storage: the strategy's ``.to`` where it builds on the host, ``allocate`` after
        sharding where it builds on meta), else initialised on the host."""
        torch.manual_seed(self.cfg.train.seed)
        with torch.device("meta") if self.fake else contextlib.nullcontext():
            model = MTPTransformer(self.cfg.model)
        if self.cfg.train.freeze == "trunk":
            freeze_next_token_path(model)
        return model

    def set_up(self, model: MTPTransformer, on_optimizer_step: Optional[Callable[[bool], None]] = None) -> None:
        """Parallelisation, optimizer, schedule, batches. ``on_optimizer_step(True / False)`` is
        called before and after each optimizer step."""
        cfg = self.cfg
        self.model = self.strategy.parallelize(model)
        if is_meta(self.model):  # built on meta and sharded, as the job does: storage, no initial values
            allocate(self.model, self.env.device)
            run_deferred(self.model)
        self.optimizer = self.strategy.build_optimizer(self.model, lambda m: build_adamw(m, cfg.optim))
        if self.emulation.foreach:  # torch's default for CUDA tensors
            for group in self.optimizer.param_groups:
                group["foreach"] = True
        if on_optimizer_step is not None:
            self.optimizer.register_step_pre_hook(lambda *_: on_optimizer_step(True))
            self.optimizer.register_step_post_hook(lambda *_: on_optimizer_step(False))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        init_adamw_state(self.optimizer)
        if self.fake and self.strategy.pipeline is not None:
            self.strategy.pipeline.example_tensors = self._stage_example_tensors()
        self.train_iter = _random_batches(cfg, self.env.device)
        self.ready = True

    def _stage_example_tensors(self) -> Callable:
        """The tensors that cross this pipeline's stage boundaries, for the schedule's static mode
        (``Pipeline.example_tensors``): a fake process group carries no shapes between stages.
        Every boundary carries hidden states [micro-batch, seq, dim] in the dtype a stage outputs,
        found by running this rank's first stage once on a micro-batch (no gradients); the first
        stage takes token ids."""
        cfg, pipe = self.cfg, self.strategy.pipeline
        B, T = cfg.train.micro_batch_size, self.seq_len
        tokens = torch.zeros(B, T + cfg.model.n_future, dtype=torch.long, device=self.env.device)
        probe = pipe.stage_modules[0]
        x = tokens[:, :T] if probe.first else torch.zeros(B, T, cfg.model.dim, device=self.env.device)
        pipe._set_inputs(T, self.document_end_id)
        autocast = (torch.autocast(self.env.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            hidden = probe(x, tokens)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # shapes only: plain meta tensors, which the count leaves out
            hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device="meta")
            ids = torch.empty(B, T, dtype=torch.long, device="meta")

        def examples(stage) -> dict:
            return {"input_args": ids if stage.first else hidden, "output_args": hidden,
                    "input_grads": (None,) if stage.first else hidden,
                    "output_grads": (None,) if stage.last else hidden}

        return examples

    def log(self, msg: str) -> None:
        pass


class _ChunksOnDemand(Sequence):
    """What ``torch.chunk`` + empty padding returns (FSDP2's ``_chunk_with_empty``), each view
    made when asked for. FSDP slices every parameter into world-size views to keep its own
    rank's; under fake tensors each view costs a fake-tensor construction, which made set-up
    grow with the world size (64 ranks: a third of a 7b plan's time)."""

    def __init__(self, tensor: torch.Tensor, num_chunks: int, dim: int):
        self.tensor, self.num_chunks, self.dim = tensor, num_chunks, dim
        n = tensor.size(dim)
        self.size = -(-n // num_chunks)  # torch.chunk's chunk size
        self.real = -(-n // self.size) if n else num_chunks  # how many chunks torch.chunk makes

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.num_chunks:
            raise IndexError(i)
        if i >= self.real:
            return self[0].new_empty(0)
        start = min(i * self.size, self.tensor.size(self.dim))
        return self.tensor.narrow(self.dim, start, min(self.size, self.tensor.size(self.dim) - start))


@contextlib.contextmanager
def _fsdp_chunks_on_demand():
    """Planning only: FSDP2's parameter slicing through ``_ChunksOnDemand`` (same views, made
    lazily). If this torch has no such function, nothing changes (planning is just slower)."""
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:
        yield
        return
    original = getattr(_fsdp_param, "_chunk_with_empty", None)
    if original is None:
        yield
        return
    _fsdp_param._chunk_with_empty = _ChunksOnDemand
    try:
        yield
    finally:
        _fsdp_param._chunk_with_empty = original


def _build_meshes_now(strategy) -> None:
    """Device meshes compute their coordinates from real tensors: build the layout's (cached)
    mesh before fake mode."""
    strategy.dims.mesh  # noqa: B018


def _classifier(trainer: StepOnlyTrainer) -> Callable[[dict, dict], dict]:
    """What the live storages are, by category (called at each new peak): parameters (sharded,
    and unsharded while FSDP holds them gathered; buffers), gradients, optimizer (AdamW state and
    its step's temporaries), logits, activations (the rest of what the step allocates).

    Only the storages of parameters, gradients and optimizer state are looked up (a few per
    parameter); everything else goes by the tag it was allocated under (``by_tag`` totals), so a
    call does not walk the thousands of live activations."""
    cache: dict = {}
    to_category = {"parameters": "parameters", "optimizer": "optimizer", "logits": "logits"}

    def classify(live: dict, by_tag: dict) -> dict:
        if not hasattr(trainer, "optimizer"):  # still building
            return {"parameters": sum(e[0] for e in live.values())}
        if not cache:
            cache["modules"] = list(trainer.model.modules())
            cache["sharded"] = list(trainer.model.parameters())
            cache["fsdp_params"] = _fsdp_params(cache["modules"])
        if not cache.get("state_final"):  # the state is made during set-up, then stays
            cache["state"] = _storage_ids(t for s in trainer.optimizer.state.values() for t in s.values()
                                          if isinstance(t, torch.Tensor))
            cache["state_final"] = getattr(trainer, "ready", False)
        params = [p for m in cache["modules"] for p in m._parameters.values() if p is not None] + cache["sharded"]
        param_ids = _storage_ids(params)
        # (+ FSDP's float32 sum of unsharded gradients over micro-batches whose reduction is deferred:
        # a pipeline schedule defers it to the step's last micro-batch)
        accumulated = [getattr(f, "unsharded_accumulated_grad", None) for f in cache["fsdp_params"]]
        grad_ids = _storage_ids([p.grad for p in params] + accumulated) - param_ids
        state_ids = cache["state"] - param_ids - grad_ids
        out = dict.fromkeys(CATEGORIES, 0)
        rest = dict(by_tag)
        for category, ids in (("parameters", param_ids), ("gradients", grad_ids), ("optimizer", state_ids)):
            for key in ids:
                entry = live.get(key)
                if entry is not None:
                    out[category] += entry[0]
                    rest[entry[1]] -= entry[0]
        for tag, nbytes in rest.items():
            out[to_category.get(tag, "activations")] += nbytes
        return out

    return classify


def _fsdp_params(modules) -> list:
    """FSDP2's per-parameter records (``FSDPParam``) of ``modules`` (none without FSDP)."""
    out = []
    for m in modules:
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        for group in getattr(state, "_fsdp_param_groups", ()):
            out.extend(group.fsdp_params)
    return out


def mask_bias_bytes(cfg: JobConfig, emulation: Emulation, pipeline=None, micro_batches: int = 1) -> int:
    """GPU only, with document masking: the memory-efficient attention kernel takes the boolean
    [B, 1, T, T] mask as an additive bias in the activation dtype, converted per call and kept
    for the backward, once per attention layer whose activations are alive (the fake CPU kernel
    takes the boolean mask itself). Transformer heads run one at a time under the
    head-sequential loss, all at once under the naive loss; under full activation
    checkpointing only the block being recomputed holds one.

    Under pipeline parallelism (``pipeline``: this rank's ``Pipeline``) a rank holds its stages'
    blocks for every micro-batch in flight: all of them under gpipe, at most ``pp_size - s`` on
    stage s under 1f1b, and (an upper bound) all of them under interleaved_1f1b and zbv; the
    heads only on the last stage."""
    if not (cfg.data.document_masking and emulation.cuda):
        return 0
    m = cfg.model
    per_layer = cfg.train.micro_batch_size * cfg.data.seq_len ** 2 * (2 if emulation.amp_dtype is not None else 4)
    if cfg.parallel.activation_checkpointing == "full":
        return per_layer
    head_blocks = 0 if m.head_type == "linear" else m.head_layers
    heads_alive = m.n_future if cfg.loss.impl == "naive" else 1
    if pipeline is None:
        return per_layer * (m.trunk_layers + heads_alive * head_blocks)
    from mtp_pretrain.parallel.pipeline import stage_blocks

    ranges = stage_blocks(m.trunk_layers, pipeline.num_stages, cfg.parallel.pp_layout)
    in_flight = {"1f1b": lambda s: min(micro_batches, pipeline.pp - s)}.get(cfg.parallel.pp_schedule,
                                                                              lambda s: micro_batches)
    layers = sum(len(ranges[s]) * in_flight(s) for s in pipeline.local)
    return per_layer * (layers + (heads_alive * head_blocks if pipeline.has_last else 0))


def plan_step(cfg: JobConfig, world_size: int, device: str = "h100-80gb", micro_batches: Optional[int] = None,
              rank: int = 0) -> StepMemory:
    """Run one training step of ``cfg`` under fake tensors as rank ``rank`` of ``world_size`` and
    return its per-rank memory. ``device``: a GPU type (bf16 autocast, foreach AdamW) or
    ``cpu`` (what the job does on CPU; for validation against measurement).
    ``micro_batches``: micro-batches run (default: the job's gradient accumulation, at most 2:
    a third one repeats the second's memory)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from mtp_pretrain.parallel.setup import DistEnv

    if cfg.parallel.strategy not in PLANNABLE:
        raise ValueError(f"mtp-plan runs parallel.strategy in {PLANNABLE}; {cfg.parallel.strategy} steps inside "
                         f"its own engine, which cannot run under fake tensors")
    if cfg.parallel.pp_size > 1 and cfg.parallel.strategy not in PLANNABLE_WITH_PIPELINE:
        raise ValueError(f"mtp-plan plans parallel.pp_size > 1 with parallel.strategy in "
                         f"{PLANNABLE_WITH_PIPELINE}, not {cfg.parallel.strategy}: with tensor parallelism the "
                         f"hidden states cross stages as local shards whose shapes the plan does not derive yet")
    if cfg.parallel.strategy == "none" and world_size > cfg.parallel.pp_size:
        raise ValueError(f"parallel.strategy=none is one process (per pipeline stage: parallel.pp_size="
                         f"{cfg.parallel.pp_size}); --world-size {world_size} needs ddp, fsdp, tp or fsdp_tp")
    if device != "cpu" and device not in GPU_TYPES:
        raise ValueError(f"device {device!r} is not a known GPU type; choose one of {', '.join(GPU_TYPES)}")
    emulation = Emulation.for_device(cfg, device)
    t0 = time.perf_counter()
    if dist.is_initialized():
        raise RuntimeError("mtp-plan needs a process without a process group: it starts a fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        env = DistEnv(rank, world_size, 0, torch.device("cpu"), "fake")
        trainer = StepOnlyTrainer(cfg, env, emulation, micro_batches)
        vocab = cfg.model.vocab_size
        tracker = LiveStorageBytes(vocab_sizes=(vocab, vocab // trainer.strategy.dims.tp),
                                   counted=lambda t: isinstance(t, FakeTensor), classify=_classifier(trainer))

        def optimizer_step(starting: bool) -> None:
            tracker.tag = "optimizer" if starting else "activations"

        model = trainer.build_model()
        with FakeTensorMode(allow_non_fake_inputs=True), tracker, FakeScalars(), _fsdp_chunks_on_demand():
            tracker.tag = "parameters"
            trainer.set_up(model, optimizer_step)
            before, set_up_peak = tracker.total, tracker.peak
            tracker.reset_peak()
            tracker.tag = "activations"
            trainer.train_step()
    finally:
        dist.destroy_process_group()
    pipe = trainer.strategy.pipeline
    return StepMemory(peak=tracker.peak, breakdown=tracker.peak_breakdown, before_step=before, set_up_peak=set_up_peak,
                      mask_bias_bytes=mask_bias_bytes(cfg, emulation, pipe, trainer.grad_accum),
                      micro_batch_size=cfg.train.micro_batch_size, micro_batches=trainer.grad_accum,
                      seconds=time.perf_counter() - t0, pp_rank=trainer.strategy.dims.pp_rank,
                      pipeline_stages=tuple(pipe.local) if pipe is not None else ())


def plan_job(cfg: JobConfig, world_size: int, device: str = "h100-80gb",
             micro_batches: Optional[int] = None) -> StepMemory:
    """Per-rank memory of the job: ``plan_step`` as rank 0, or under pipeline parallelism one
    fake step per pp rank (as that rank's first global rank; its data-parallel ranks hold the same
    shapes) -- the worst of them, with every pp rank's in ``stages``."""
    pp = cfg.parallel.pp_size
    if pp == 1:
        return plan_step(cfg, world_size, device, micro_batches)
    if world_size % pp:
        raise ValueError(f"--world-size {world_size} is not divisible by parallel.pp_size={pp}")
    stages = [plan_step(cfg, world_size, device, micro_batches, rank=r * (world_size // pp)) for r in range(pp)]
    worst = max(stages, key=lambda m: m.predicted)
    return replace(worst, stages=stages, seconds=sum(m.seconds for m in stages))


def measure_step(cfg: JobConfig, env, micro_batches: Optional[int] = None, device: str = "cpu") -> dict:
    """The measured counterpart of ``plan_step``: the same set-up and one real step (real tensors,
    the caller's process group, ``env.device``), with the allocator's own count of live bytes.
    ``device`` names what the step emulates, as for ``plan_step`` (a GPU type on CUDA).

    CUDA: ``torch.cuda.max_memory_allocated`` over the step (peak statistics reset when it
    starts), minus what was allocated before the job's set-up.
    CPU: torch's profiler with ``profile_memory`` reports every allocation and free of the CPU
    allocator with its running total of bytes allocated since profiling started -- the quantity
    CUDA's ``max_memory_allocated`` counts (requested bytes; CUDA rounds each block up to
    512 B). Profiling starts before the model is built, so the total counts every tensor of the
    job; the peak is taken over the step (from ``train_step``'s start to its end), which leaves
    out the host-built full model that sharding frees during set-up (the plan reports that
    apart). Returns {"peak", "before_step"} in bytes."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer = StepOnlyTrainer(cfg, env, Emulation.for_device(cfg, device), micro_batches, fake=False)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
        start = torch.cuda.memory_allocated(env.device)
        trainer.set_up(trainer.build_model())
        torch.cuda.synchronize(env.device)
        before = torch.cuda.memory_allocated(env.device) - start
        set_up_peak = torch.cuda.max_memory_allocated(env.device) - start
        torch.cuda.reset_peak_memory_stats(env.device)
        trainer.train_step()
        torch.cuda.synchronize(env.device)
        return {"peak": torch.cuda.max_memory_allocated(env.device) - start, "before_step": before,
                "set_up_peak": set_up_peak}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.set_up(trainer.build_model())
        with record_function("mtp_plan_measured_step"):
            trainer.train_step()
    events = _profiler_events(prof)
    step = [e for e in events if e.name == "mtp_plan_measured_step"]
    if len(step) != 1:
        raise RuntimeError(f"profiler: expected one measured-step marker, found {len(step)}")
    totals = allocator_totals(events)
    before = [total for t, total in totals if t < step[0].start_time_ns]
    during = [total for t, total in totals if t >= step[0].start_time_ns]
    if not before or not during:
        raise RuntimeError("profiler: no allocations recorded before or during the step")
    return {"peak": max(during), "before_step": before[-1]}


def _profiler_events(prof) -> list:
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        e = todo.pop()
        events.append(e)
        todo.extend(e.children)
    return events


def allocator_totals(events) -> list[tuple[int, int]]:
    """(time ns, live bytes allocated since profiling began) after each CPU allocation or free
    that a ``profile(profile_memory=True)`` session recorded, in time order."""
    from torch._C._profiler import _EventType

    allocs = sorted((e for e in events if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    if not allocs:
        raise RuntimeError("profiler: no allocations recorded")
    # The allocator's running total is process-wide across profiling sessions: start from what it was.
    base = allocs[0].extra_fields.total_allocated - allocs[0].extra_fields.alloc_size
    return [(e.start_time_ns, e.extra_fields.total_allocated - base) for e in allocs]


def usable_bytes(memory_gib: float) -> float:
    """What tensors may hold on a device of ``memory_gib``: minus the reserve, over the allocator's overhead."""
    return (memory_gib - RESERVED_GIB) * GiB / (1 + FRAGMENTATION)


def with_micro_batch(cfg: JobConfig, b: int) -> JobConfig:
    return replace(cfg, train=replace(cfg.train, micro_batch_size=b, global_batch_tokens=None))


SEARCH_LIMIT = 1024  # micro-batches beyond this are not searched


def largest_micro_batch(cfg: JobConfig, world_size: int, device: str, memory_gib: float, micro_batches: int,
                        measured: dict[int, StepMemory], limit: int = SEARCH_LIMIT) -> int:
    """The largest micro_batch_size whose predicted peak fits ``usable_bytes(memory_gib)``
    (0 if even 1 does not), running ``micro_batches`` per step. Peaks grow about linearly in the
    micro-batch: a line through the predictions at 1 and 2 proposes a size, fake runs confirm
    it and step down or up. ``measured`` caches the fake steps by micro-batch size."""
    budget = usable_bytes(memory_gib)

    def peak(b: int) -> int:
        if b not in measured:
            measured[b] = plan_job(with_micro_batch(cfg, b), world_size, device, micro_batches)
        return measured[b].predicted

    if peak(1) > budget:
        return 0
    slope = max(peak(2) - peak(1), 1)
    b = max(1, min(limit, int(1 + (budget - peak(1)) // slope)))
    while b > 1 and peak(b) > budget:
        b -= max(1, b // 16)
    while b < limit and peak(b + 1) <= budget:
        b += 1
    return b


# --- the command ------------------------------------------------------------------------------
COMPARE_VARIANTS = (  # (label, loss.impl, chunked?, activation checkpointing)
    ("naive", "naive", False, "none"),
    ("head_sequential", "head_sequential", False, "none"),
    ("head_sequential + chunked CE", "head_sequential", True, "none"),
    ("naive, AC full", "naive", False, "full"),
    ("head_sequential, AC full", "head_sequential", False, "full"),
    ("head_sequential + chunked CE, AC full", "head_sequential", True, "full"),
)


def variant(cfg: JobConfig, impl: str, chunked: bool, ac: str, chunk_size: int) -> JobConfig:
    return replace(cfg, loss=replace(cfg.loss, impl=impl, chunk_size=chunk_size if chunked else 0),
                   parallel=replace(cfg.parallel, activation_checkpointing=ac))


def report_row(label: str, mem: StepMemory, memory_gib: float) -> dict:
    need = mem.predicted * (1 + FRAGMENTATION) + RESERVED_GIB * GiB
    return {"config": label, "peak_gib": round(mem.predicted / GiB, 3),
            **{f"{k}_gib": round(v / GiB, 3) for k, v in mem.breakdown.items()},
            "mask_bias_gib": round(mem.mask_bias_bytes / GiB, 3),
            "with_margin_gib": round(need / GiB, 2), "fits": bool(need <= memory_gib * GiB)}


def format_table(rows: list[dict]) -> str:
    cols = ["config", "peak_gib", *[f"{c}_gib" for c in CATEGORIES], "with_margin_gib", "fits"]
    head = ["config", "peak", "params", "grads", "optim", "activ", "logits", "+margin", "fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="mtp-plan", description="Per-rank GPU memory of an mtp-train job, from one fake step on this machine. "
        "Positional arguments are the job's Hydra overrides (as for mtp-train).",
        epilog="devices: " + ", ".join(f"{k} ({v.memory_gib:.0f} GiB)" for k, v in GPU_TYPES.items()))
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=7b parallel=fsdp")
    p.add_argument("--world-size", type=int, default=8, help="ranks (GPUs) of the job")
    p.add_argument("--device", default="h100-80gb", help="GPU type: " + ", ".join(GPU_TYPES))
    p.add_argument("--device-memory-gib", type=float, default=None, help="device memory (default: the GPU type's)")
    p.add_argument("--compare", action="store_true",
                   help="also naive vs head-sequential vs chunked cross-entropy, with and without activation "
                        "checkpointing")
    p.add_argument("--chunk-size", type=int, default=4096, help="--compare: loss.chunk_size of the chunked rows "
                   "(the job's own if it sets one)")
    p.add_argument("--no-search", action="store_true", help="skip the largest-micro-batch search")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_intermixed_args(argv)  # options may come between the overrides
    if args.device not in GPU_TYPES:
        p.error(f"--device {args.device!r} is not a known GPU type; choose one of {', '.join(GPU_TYPES)} "
                f"(or give --device-memory-gib with the closest type)")
    if args.world_size < 1:
        p.error(f"--world-size must be >= 1, got {args.world_size}")
    if args.device_memory_gib is not None and args.device_memory_gib <= RESERVED_GIB:
        p.error(f"--device-memory-gib must be above the {RESERVED_GIB} GiB reserve, got {args.device_memory_gib}")
    return args, args.overrides


def main(argv=None) -> int:
    from mtp_pretrain.config import compose_job_config

    args, overrides = parse_args(argv)
    cfg = compose_job_config(overrides)
    gpu = GPU_TYPES[args.device]
    memory_gib = args.device_memory_gib or gpu.memory_gib
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))
    m = cfg.model
    say(f"mtp-plan: model {m.name} (n_future={m.n_future}, dim {m.dim}, {m.trunk_layers} trunk blocks, vocab "
        f"{m.vocab_size}), parallel.strategy={cfg.parallel.strategy} on {args.world_size} x {args.device} "
        f"({memory_gib:.1f} GiB), micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}, loss "
        f"{cfg.loss.impl} chunk {cfg.loss.chunk_size}, AC {cfg.parallel.activation_checkpointing}")
    pp = cfg.parallel.pp_size
    if pp > 1:
        say(f"  pipeline: pp_size={pp}, schedule {cfg.parallel.pp_schedule}, one fake step per pp rank")
    job = plan_job(cfg, args.world_size, args.device)
    say(f"  {'one fake step' if pp == 1 else f'{pp} fake steps'} in {job.seconds:.1f}s "
        f"({job.micro_batches} micro-batch{'es' if job.micro_batches > 1 else ''})")
    rows = [report_row("this job" if pp == 1 else f"this job (worst: pp rank {job.pp_rank})", job, memory_gib)]
    result = {"world_size": args.world_size, "device": args.device, "device_memory_gib": round(memory_gib, 2),
              "device_peak_bf16_tflops": gpu.peak_bf16_flops / 1e12,
              "model": m.name, "n_future": m.n_future, "strategy": cfg.parallel.strategy,
              "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.data.seq_len,
              "margin": f"x{1 + FRAGMENTATION:.2f} + {RESERVED_GIB} GiB", **rows[0]}
    if pp > 1:
        stage_rows = [{**report_row(f"pp rank {s.pp_rank} (stage{'s' if len(s.pipeline_stages) > 1 else ''} "
                                    f"{', '.join(map(str, s.pipeline_stages))})", s, memory_gib),
                       "pp_rank": s.pp_rank, "stages": list(s.pipeline_stages)} for s in job.stages]
        rows += stage_rows
        result |= {"pp_size": pp, "pp_schedule": cfg.parallel.pp_schedule, "micro_batches": job.micro_batches,
                   "worst_pp_rank": job.pp_rank, "pp_ranks": stage_rows}
    if not args.no_search:
        measured = {cfg.train.micro_batch_size: job} if cfg.train.global_batch_tokens is None else {}
        say("  searching the largest micro-batch that fits ...")
        best = largest_micro_batch(cfg, args.world_size, args.device, memory_gib, job.micro_batches, measured)
        capped = best == SEARCH_LIMIT
        result["largest_micro_batch"] = best
        result["largest_micro_batch_is_search_limit"] = capped
        say(f"  largest micro_batch_size that fits: {'>= ' if capped else ''}{best} ({len(measured)} fake steps)")
    if args.compare:
        chunk = cfg.loss.chunk_size or args.chunk_size
        for label, impl, chunked, ac in COMPARE_VARIANTS:
            mem = plan_job(variant(cfg, impl, chunked, ac, chunk), args.world_size, args.device)
            rows.append(report_row(label + (f" ({chunk})" if chunked else ""), mem, memory_gib))
            say(f"  {label}: {rows[-1]['peak_gib']} GiB ({mem.seconds:.1f}s)")
        result["compare"] = rows[1:]
    say("\nper-rank prediction (GiB; peak = predicted torch.cuda.max_memory_allocated; +margin = peak x "
        f"{1 + FRAGMENTATION:.2f} + {RESERVED_GIB} GiB for CUDA context, NCCL and fragmentation):")
    say(format_table(rows))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
