"""Pipeline parallelism: the plain model cut into stages, run by a ``torch.distributed.pipelining``
schedule, with the head-sequential loss as the last stage's loss function.

Stages. The trunk's blocks are divided among ``pp_size x stages-per-rank`` stages (evenly, or by
``parallel.pp_layout``); the token embedding is on the first stage, the n heads and the shared
unembedding on the last. Each rank keeps *one* ``MTPTransformer`` in which every module that
belongs to another rank's stages is replaced by an ``AbsentModule`` (no parameters), so parameter
names -- hence checkpoints, the TP plan's patterns, optimizer groups -- are the plain model's, and
a checkpoint written under pipeline parallelism loads into one process and back (DCP merges the
ranks' disjoint keys). A ``StageModule`` is a view of one stage: it runs its blocks of that model.
Stages sit on ranks in loop order (stage s on pp rank s mod pp_size) or, for ``zbv``, in a V
(rank r holds stages r and 2 pp_size - 1 - r, so the first and last stage share rank 0).

The embedding on the last stage. Tied embeddings (the unembedding *is* the embedding matrix) and
causal heads (head i > 1 embeds token t+i-1) need the embedding matrix on the last stage too: it
keeps a replica, started from the same seed, and after each step's backward the first and last
stage's gradients of that matrix are summed (one all-reduce between the two ranks), so both
replicas take the same optimizer step and stay equal. The gradient norm counts it once.

The loss. The schedule calls the last stage's loss function on the stage output z once per
micro-batch and backpropagates what it returns through every stage. The function runs the
trainer's loss with ``trunk_output=z``: each head's forward *and backward* on a detached copy of
z (one head's logits alive at a time, as without pipelining), returning ``(z * g).sum()`` where g
is the heads' accumulated gradient, so the schedule's backward hands the trunk exactly g. The
trainer's loss already divides by the number of micro-batches, so the schedule is built with
``scale_grads=False``. On its first ``step()`` (and after a forward-only use) the schedule infers
the stages' tensor shapes by running the stage modules, and the loss function, on *uninitialised*
tensors; the loss function must not run the heads then -- their backward would add garbage to
the real gradients (the parity tests fail when it does). ``_Stage`` tells it when that pass is on.

Every stage receives the whole micro-batch of tokens as a keyword argument: each stage builds the
packed-document attention mask itself, and only hidden states travel between stages.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B,
                                          ScheduleZBVZeroBubble)
from torch.distributed.tensor import Replicate

from mtp_pretrain.config import ParallelConfig
from mtp_pretrain.loss import GradSyncHooks, MTPLoss
from mtp_pretrain.model.transformer import MTPTransformer, PackedDocuments

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "zbv": ScheduleZBVZeroBubble}
# Schedules that need at least as many micro-batches as stages (those that start backward passes
# before every forward has run).
NEEDS_MICROBATCHES_PER_STAGE = ("1f1b", "zbv")


def stage_blocks(trunk_layers: int, num_stages: int, layout: Optional[list[int]] = None) -> list[range]:
    """The trunk blocks of each stage, first to last."""
    counts = list(layout) if layout is not None else [trunk_layers // num_stages] * num_stages
    if len(counts) != num_stages or sum(counts) != trunk_layers:
        raise ValueError(f"a pipeline layout of {num_stages} stages must place all {trunk_layers} trunk blocks, "
                         f"got {counts}")
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def stage_owner(stage: int, pp_size: int, num_stages: int, v_shape: bool) -> int:
    """The pp rank that holds ``stage``: loop order, or a V (rank r: stages r and 2 pp - 1 - r)."""
    if not v_shape:
        return stage % pp_size
    lap, pos = divmod(stage, pp_size)
    return pos if lap % 2 == 0 else pp_size - 1 - pos


class AbsentModule(nn.Module):
    """Stands in for a module that another rank's pipeline stage holds: no parameters, so this
    rank's state dict, optimizer and gradient norm cover its own stages only."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} is held by another pipeline stage (parallel.pp_size > 1): run the "
                           f"model through the pipeline, or load the checkpoint into one process")


def needs_embedding_on_last_stage(model: MTPTransformer) -> bool:
    return model.cfg.tie_embeddings or model.heads_chain


def keep_stages(model: MTPTransformer, blocks: set[int], first: bool, last: bool) -> MTPTransformer:
    """Replace, in place, every module of ``model`` that none of this rank's stages uses by an
    ``AbsentModule``; returns the model."""
    for i in range(len(model.trunk)):
        if i not in blocks:
            model.trunk[i] = AbsentModule(f"trunk.{i}")
    if not last:
        for i in range(len(model.heads)):
            model.heads[i] = AbsentModule(f"heads.{i}")
        model.unembed = AbsentModule("unembed")
    if not (first or (last and model.heads_chain)):
        # (a tied unembedding keeps the matrix as unembed.weight on the last stage)
        model.tok_embeddings = AbsentModule("tok_embeddings")
    return model


class StageModule(nn.Module):
    """One pipeline stage, a view of the rank's model: (embedding) + its trunk blocks. Its
    blocks are registered here too (the schedule reads ``parameters()``); the model itself is a
    plain attribute, so its names stay the model's."""

    def __init__(self, model: MTPTransformer, index: int, num_stages: int, blocks: range,
                 to_stage_input: Callable = lambda x: x, from_stage_output: Callable = lambda x: x):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == num_stages - 1
        self.block_ids = blocks
        # What the step's batches are (set by the Pipeline before each use).
        self.seq_len: int = 0
        self.document_end_id: Optional[int] = None
        self.embedding = model.tok_embeddings if self.first else None
        self.blocks = nn.ModuleList(model.trunk[i] for i in blocks)
        self.__dict__["model"] = model
        # Tensor parallelism: hidden states cross stages as local tensors (see Pipeline).
        self.to_stage_input, self.from_stage_output = to_stage_input, from_stage_output

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x: input ids [B, T] (first stage) or the previous stage's hidden states; tokens: the
        micro-batch's windows [B, T + n] (for the packed-document mask)."""
        T = self.seq_len
        documents = (None if self.document_end_id is None
                     else PackedDocuments.from_tokens(tokens[:, :T], self.document_end_id))
        if self.first:
            self.model.check_length(T)
            x = self.model.tok_embeddings(x)
        else:
            x = self.to_stage_input(x)
        z = self.model.trunk_segment(x, self.block_ids, documents=documents)
        return z if self.last else self.from_stage_output(z)  # the last stage's z goes to the loss


class _Stage(PipelineStage):
    """A ``PipelineStage`` that says when the schedule's shape inference, rather than a
    micro-batch, is calling the loss function (on uninitialised tensors)."""

    shape_pass = False

    def _backward_metadata_inference(self, *args, **kwargs):
        self.shape_pass = True
        try:
            return super()._backward_metadata_inference(*args, **kwargs)
        finally:
            self.shape_pass = False


# The trainer's loss for one micro-batch: (micro-batch index, tokens, hooks, trunk_output) -> MTPLoss.
StepLoss = Callable[..., MTPLoss]


class Pipeline:
    """This rank's pipeline stages and the schedule that runs them (built at the first step,
    when the number of micro-batches is known)."""

    def __init__(self, cfg: ParallelConfig, pp_rank: int, pp_group, stage_group_size: int,
                 device: torch.device):
        """``pp_group``: the ranks that hold this rank's model's other stages (one per pp rank, same
        data- and tensor-parallel coordinates); ``stage_group_size``: ranks per stage (dp x tp)."""
        self.cfg, self.pp, self.pp_rank, self.pp_group = cfg, cfg.pp_size, pp_rank, pp_group
        self.stage_group_size, self.device = stage_group_size, device
        self.v_shape = cfg.pp_schedule == "zbv"
        self.num_stages = cfg.pp_size * cfg.pp_stages_per_rank
        self.local = [s for s in range(self.num_stages)
                      if stage_owner(s, self.pp, self.num_stages, self.v_shape) == pp_rank]
        self.owner = [stage_owner(s, self.pp, self.num_stages, self.v_shape) for s in range(self.num_stages)]
        self.has_first, self.has_last = 0 in self.local, self.num_stages - 1 in self.local
        self.stage_modules: list[StageModule] = []
        self.shared_group = None  # first and last stage's ranks, for the embedding replica's gradient
        self._schedule = None
        self._n_microbatches = 0
        self._stages: list[_Stage] = []
        self._step_state: Optional[dict] = None
        # mtp-plan runs the schedule under fake tensors and a fake process group, across which
        # stages cannot exchange their tensors' shapes: it gives each stage example tensors here
        # (PipelineStage's static mode: input_args, output_args, ...); None = inferred at the first step.
        self.example_tensors: Optional[Callable[[StageModule], dict]] = None

    # --- set-up ------------------------------------------------------------------------------------
    def validate(self, n_microbatches: int) -> None:
        """Fail at start-up on a number of micro-batches the schedule cannot run."""
        name = self.cfg.pp_schedule
        if name in NEEDS_MICROBATCHES_PER_STAGE and n_microbatches < self.num_stages:
            raise ValueError(f"parallel.pp_schedule={name} needs at least as many micro-batches per step as "
                             f"pipeline stages ({self.num_stages}), got {n_microbatches} (gradient accumulation "
                             f"steps = train.global_batch_tokens / (train.micro_batch_size x data.seq_len x "
                             f"data-parallel ranks)); raise train.global_batch_tokens or use gpipe")
        if name == "interleaved_1f1b":
            rounds = max(1, n_microbatches // self.pp)
            if n_microbatches % rounds:
                raise ValueError(f"parallel.pp_schedule=interleaved_1f1b needs the micro-batches per step "
                                 f"({n_microbatches}) to be a multiple of {rounds} (= micro-batches // pp_size)")

    def split(self, model: MTPTransformer, to_stage_input: Callable = lambda x: x,
              from_stage_output: Callable = lambda x: x) -> MTPTransformer:
        """Keep this rank's stages of ``model`` (in place) and make their ``StageModule`` views."""
        ranges = stage_blocks(model.cfg.trunk_layers, self.num_stages, self.cfg.pp_layout)
        held = {b for s in self.local for b in ranges[s]}
        keep_stages(model, held, self.has_first, self.has_last)
        self.stage_modules = [StageModule(model, s, self.num_stages, ranges[s], to_stage_input, from_stage_output)
                              for s in self.local]
        return model

    def set_shared_group(self, group) -> None:
        """The two ranks (first stage, last stage) whose embedding replicas sum their gradients;
        None where one rank holds both."""
        self.shared_group = group

    def shared_parameter(self, model: MTPTransformer) -> Optional[nn.Parameter]:
        """The embedding matrix if both the first and the last stage use it, on a rank holding one of them."""
        if not needs_embedding_on_last_stage(model) or not (self.has_first or self.has_last):
            return None
        return model.unembed.weight if self.has_last and not self.has_first and not model.heads_chain \
            else model.tok_embeddings.weight

    def _build(self, n_microbatches: int) -> None:
        self.validate(n_microbatches)
        self._stages = [_Stage(m, m.index, self.num_stages, self.device, group=self.pp_group,
                               **(self.example_tensors(m) if self.example_tensors is not None else {}))
                        for m in self.stage_modules]
        cls = SCHEDULES[self.cfg.pp_schedule]
        if cls in (ScheduleGPipe, Schedule1F1B):
            self._schedule = cls(self._stages[0], n_microbatches, loss_fn=self._stage_loss, scale_grads=False)
        else:
            self._schedule = cls(self._stages, n_microbatches, loss_fn=self._stage_loss, scale_grads=False)
        self._n_microbatches = n_microbatches

    # --- one step ------------------------------------------------------------------------------
    def _stage_loss(self, z: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The last stage's loss function (called by the schedule once per micro-batch)."""
        if any(s.shape_pass for s in self._stages):
            # Shape inference on uninitialised tensors: no head runs, no gradient is touched;
            # the result only needs z's shape for the input gradients' metadata.
            return (_local(z) * 0).sum()
        st = self._step_state
        k = len(st["per_head"])
        # (the last stage runs the micro-batches' forwards in order: this is micro-batch k)
        out = st["loss"](k, tokens, st["hooks"](k == self._n_microbatches - 1), z)
        st["per_head"].append(torch.stack(out.per_head).double().cpu())
        return out.trunk_loss

    def forward_backward(self, model: MTPTransformer, batches: list[torch.Tensor], loss: StepLoss,
                         hooks: Callable[[bool], GradSyncHooks], seq_len: int,
                         document_end_id: Optional[int]) -> torch.Tensor:
        """Run the step's micro-batches through the schedule (forward and backward); returns the
        per-head losses averaged over the micro-batches, on every rank of the pipeline."""
        if self._schedule is None or self._n_microbatches != len(batches):
            self._build(len(batches))
        self._set_inputs(seq_len, document_end_id)
        self._step_state = {"loss": loss, "hooks": hooks, "per_head": []}
        tokens = torch.cat(batches)
        try:
            # The same input everywhere: each stage takes what it uses (ids: the first stage's
            # input; tokens: every stage's keyword argument; target: the last stage's loss).
            self._schedule.step(tokens[:, :seq_len], target=tokens, tokens=tokens)
        finally:
            per_head, self._step_state = self._step_state["per_head"], None
        n = model.n_future
        if self.has_last:
            if len(per_head) != len(batches):
                raise RuntimeError(f"the pipeline schedule ran the loss {len(per_head)} times for "
                                   f"{len(batches)} micro-batches")
            mean = torch.stack(per_head).sum(0) / len(batches)
        else:
            mean = torch.zeros(n, dtype=torch.float64)
        return self._from_last_stage(mean)

    def _set_inputs(self, seq_len: int, document_end_id: Optional[int]) -> None:
        for m in self.stage_modules:
            m.seq_len, m.document_end_id = seq_len, document_end_id

    def _from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as the last stage holds it, on every rank of the pipeline (others pass zeros)."""
        if not self.has_last:
            t = torch.zeros_like(t)
        buf = t.to(self.device)
        dist.all_reduce(buf, group=self.pp_group)
        return buf.cpu()

    def finish_backward(self, model: MTPTransformer) -> None:
        """Sum the embedding replicas' gradients of the first and last stage (once per step)."""
        p = self.shared_parameter(model)
        if p is None or self.shared_group is None:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if hasattr(p, "placements") and p.grad.placements != p.placements:
            # (a vocab-parallel embedding's gradient can come replicated): both ranks' local
            # parts must be the same slice of the matrix
            p.grad = p.grad.redistribute(p.device_mesh, p.placements)
        dist.all_reduce(_local(p.grad), group=self.shared_group)

    def grad_norm_squares(self, model: MTPTransformer) -> torch.Tensor:
        """This rank's share of the global squared gradient norm: its local gradients' squares,
        divided by the number of ranks holding the same values (replicated DTensor placements,
        plain tensors copied over the stage's ranks), the last stage's embedding replica left out
        where the first stage (another rank) counts it."""
        skip = self.shared_parameter(model) if self.has_last and not self.has_first else None
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in model.parameters():
            if p.grad is None or p is skip:
                continue
            g = p.grad
            if hasattr(g, "to_local"):
                if any(pl.is_partial() for pl in g.placements):
                    g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
                replicas = math.prod(n for n, pl in zip(g.device_mesh.shape, g.placements) if pl.is_replicate())
                local = g.to_local()
            else:
                local, replicas = g, self.stage_group_size
            total += local.detach().double().pow(2).sum() / replicas
        return total

    # --- forward only (validation) -------------------------------------------------------------
    @torch.no_grad()
    def forward_last(self, tokens: torch.Tensor, seq_len: int, document_end_id: Optional[int],
                     last: Callable[[torch.Tensor], torch.Tensor], size: int) -> torch.Tensor:
        """Run ``tokens`` through the stages (no schedule: one batch, stage after stage) and
        ``last(z)`` on the last stage; returns its result (a float64 vector of ``size``) on every
        rank of the pipeline."""
        self._set_inputs(seq_len, document_end_id)
        x = tokens[:, :seq_len]
        for s in range(self.num_stages):
            if self.owner[s] != self.pp_rank:
                if s + 1 < self.num_stages and self.owner[s + 1] == self.pp_rank:
                    x = self._recv_from(self.owner[s])
                continue
            x = self.stage_modules[self.local.index(s)](x, tokens)
            if s + 1 < self.num_stages and self.owner[s + 1] != self.pp_rank:
                self._send_to(x, self.owner[s + 1])
        out = last(x).double().cpu() if self.has_last else torch.zeros(size, dtype=torch.float64)
        return self._from_last_stage(out)

    def _peer(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.pp_group, pp_rank)

    def _send_to(self, x: torch.Tensor, pp_rank: int) -> None:
        x = x.contiguous()
        header = torch.tensor([_DTYPES.index(x.dtype), x.dim(), *x.shape], dtype=torch.long)
        dist.send(torch.cat([header, torch.zeros(8 - header.numel(), dtype=torch.long)]).to(self.device),
                  self._peer(pp_rank), group=self.pp_group)
        dist.send(x, self._peer(pp_rank), group=self.pp_group)

    def _recv_from(self, pp_rank: int) -> torch.Tensor:
        header = torch.zeros(8, dtype=torch.long, device=self.device)
        dist.recv(header, self._peer(pp_rank), group=self.pp_group)
        dtype, ndim = _DTYPES[int(header[0])], int(header[1])
        x = torch.empty([int(v) for v in header[2:2 + ndim]], dtype=dtype, device=self.device)
        dist.recv(x, self._peer(pp_rank), group=self.pp_group)
        return x


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (a scalar built from it backpropagates as a plain tensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def clip_pipeline_grads_(pipeline: Pipeline, model: MTPTransformer, max_norm: float) -> torch.Tensor:
    """Global pre-clip gradient norm over every stage (one all-reduce over all ranks); gradients
    scaled down to ``max_norm`` (0 = off), the same factor on every stage."""
    from mtp_pretrain.parallel.grad_norm import scale_grads_to_norm_

    sq = pipeline.grad_norm_squares(model)
    dist.all_reduce(sq)
    norm = sq.sqrt().cpu()
    scale_grads_to_norm_([p for p in model.parameters() if p.grad is not None], norm, max_norm)
    return norm.float()


def build_pipeline(cfg: ParallelConfig, dims, device: torch.device) -> Pipeline:
    """The pipeline of this rank in the layout ``dims`` (``parallel.layout.ParallelDims``)."""
    mesh = dims.mesh
    pipe = Pipeline(cfg, dims.pp_rank, mesh["pp"].get_group(), dims.dp * dims.tp, device)
    if cfg.pp_schedule != "zbv":  # V-shaped: rank 0 holds the first and the last stage
        columns = mesh.mesh.reshape(dims.pp, -1)
        pairs = [[int(columns[0, c]), int(columns[-1, c])] for c in range(columns.shape[1])]
        group, _ = dist.new_subgroups_by_enumeration(pairs)
        pipe.set_shared_group(group if dims.pp_rank in (0, dims.pp - 1) else None)
    return pipe
