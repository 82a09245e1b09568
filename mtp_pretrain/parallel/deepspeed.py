"""DeepSpeed ZeRO stage 1 / 2 / 3 (``parallel.strategy=deepspeed parallel.zero_stage=N``).

``deepspeed.initialize`` wraps the plain model and the AdamW built by ``mtp_pretrain.optim``; the
engine's config is generated from the Hydra config (``zero.zero_config``): fp32 or bf16 from
``train.dtype``, ``gradient_clipping`` from ``optim.grad_clip``, gradient accumulation left to
the Trainer (the engine sees one accumulation step per optimizer step). The learning-rate
schedule keeps driving the wrapped AdamW's param groups, which ZeRO steps.

The head-sequential loss calls the model's modules directly (trunk, each head, the shared
unembedding); ZeRO-3's fetch/release hooks sit on every module, so that works unchanged. All of a
step's backward passes -- n per micro-batch for the unembedding -- run inside the engine's
``coalesce_grad_reduction()``: gradients accumulate locally and are reduced (ZeRO-1: all-reduced,
ZeRO-2/3: reduce-scattered into the partitions) once, when the last micro-batch is done. So the
shared unembedding's gradient is communicated once per step, not once per head.

The engine owns the optimizer step: ``step`` runs ``engine.step()``, which clips with
``optim.grad_clip``, reports DeepSpeed's pre-clip global norm, and skips (discarding the
gradients) when that norm is non-finite; a non-finite loss is routed the same way
(``zero.zero_engine_step``), so a step means what it means under every other strategy.

Initialisation: under ZeRO-3 the model is built on the meta device and each rank creates only its
own partitions, from ``model/init.py``'s per-parameter values (``zero.partition_initial_values``,
called by ``materialize`` before ``deepspeed.initialize``); ZeRO-1/2 build the whole model on the
host (every rank keeps full parameters there). Both give the one-process initial weights.

Checkpoints: the engine's partitioned state is mapped onto the common DCP layout -- each
parameter's full fp32 value and full AdamW moments under its plain-model name, assembled with
``deepspeed.utils.safe_get_full_*`` -- so a ZeRO checkpoint loads under any other strategy and
world size, exports with ``mtp-export``, and a run under ``deepspeed`` resumes from any
strategy's checkpoint. The limit: every rank materialises each full tensor while saving/loading
(one at a time, not the whole model at once for the model weights under ZeRO-3 -- but the
state-dict dict holds all of them; see docs/parallelism.md).
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.optim import group_param_names
from mtp_pretrain.parallel import zero
from mtp_pretrain.parallel.base import Strategy


def import_deepspeed(device_type: str):
    """Import deepspeed for this device, or raise a clear error."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
    except Exception as e:  # noqa: BLE001 - any import failure means: cannot initialise here
        raise RuntimeError(f"parallel.strategy=deepspeed: deepspeed cannot be imported on this machine "
                           f"({type(e).__name__}: {e})") from e
    acc = get_accelerator().device_name()
    if acc != device_type and not (device_type == "cuda" and acc == "cuda"):
        raise RuntimeError(f"parallel.strategy=deepspeed: DeepSpeed's accelerator is {acc!r} but the job runs on "
                           f"{device_type!r} (set DS_ACCELERATOR={device_type} before starting)")
    return deepspeed


def _ensure_process_group(env) -> None:
    """DeepSpeed needs a process group even for one process (torchrun/srun/deepspeed launchers
    with several ranks already made one in ``init_distributed``)."""
    import socket

    import torch.distributed as dist

    # DeepSpeed reads these (srun sets SLURM_* instead; one process sets nothing)
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    if dist.is_initialized():
        return
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        # a launcher's rendezvous (torchrun with one process: its agent hosts the store)
        dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(env.backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class DeepSpeedGradSync(GradSyncHooks):
    """Nothing per head: the whole step is one coalesced reduction (see the module docstring)."""


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    full_logits = decodes = False
    zero_optimizer = True

    def __init__(self, cfg, env, param_dtype: torch.dtype | None = None):
        super().__init__(cfg, env)
        self.param_dtype = param_dtype
        self.engine = None
        self._coalesce: contextlib.ExitStack | None = None

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        if self.cfg.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 1, 2 or 3 for parallel.strategy=deepspeed, "
                             f"got {self.cfg.zero_stage}")
        super().validate(model_cfg, seq_len)
        if self.cfg.cpu_offload:
            raise ValueError("parallel.cpu_offload is an fsdp option; DeepSpeed offload is not wired up")
        deepspeed = import_deepspeed(self.env.device.type)
        if not hasattr(deepspeed.DeepSpeedEngine, "coalesce_grad_reduction"):
            raise RuntimeError(f"parallel.strategy=deepspeed needs DeepSpeedEngine.coalesce_grad_reduction "
                               f"(DeepSpeed >= 0.19); this is {deepspeed.__version__}")
        if model_cfg.tie_embeddings and self.cfg.zero_stage == 3:
            raise ValueError("model.tie_embeddings with ZeRO-3 is untested here; use zero_stage 1/2 or fsdp")

    def shards(self, model: nn.Module):
        return zero.ZeroPartitions() if self.cfg.zero_stage == 3 else super().shards(model)

    def materialize(self, model: nn.Module, seed: int, log) -> None:
        """ZeRO-3 (the only stage built on the meta device: ``materialize.builds_on_meta``): each
        rank's partitions of the meta-device model, initialised without communication
        (``zero.partition_initial_values``), before ``deepspeed.initialize`` sees the model."""
        if self.cfg.zero_stage != 3:
            return super().materialize(model, seed, log)
        import_deepspeed(self.env.device.type)
        _ensure_process_group(self.env)
        bf16 = self.param_dtype == torch.bfloat16
        zero.partition_initial_values(model, self.env.device, torch.bfloat16 if bf16 else torch.float32, seed,
                                      zero.zero_config(3, bf16=bf16), log)

    def build_optimizer(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        import_deepspeed(self.env.device.type)  # DS_ACCELERATOR before deepspeed's first import
        _ensure_process_group(self.env)
        optimizer = make_optimizer(model)
        self.group_fqns = group_param_names(model, optimizer)  # before ZeRO flattens the groups
        config = zero.zero_config(self.cfg.zero_stage, bf16=self.param_dtype == torch.bfloat16)
        self.engine, self.ds_optimizer = zero.zero_initialize(model, optimizer, config, self.env.local_rank)
        # The LR scheduler drives the wrapped AdamW: ZeRO steps it with its flat partitions.
        return optimizer

    # --- one step ------------------------------------------------------------------------------
    def grad_sync_hooks(self, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
        if self._coalesce is None:  # first micro-batch of the step: one reduction for all of them
            self._coalesce = contextlib.ExitStack()
            self._coalesce.enter_context(self.engine.coalesce_grad_reduction())
        return DeepSpeedGradSync()

    def finish_backward(self, model: nn.Module) -> None:
        if self._coalesce is not None:
            self._coalesce.close()  # the single reduction pass
            self._coalesce = None

    def step(self, model: nn.Module, optimizer, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        grad_norm, stepped = zero.zero_engine_step(self.engine, model, max_norm, loss_is_finite)
        if not getattr(self, "_relinked", False):
            zero.link_optimizer_state(self.engine)
            self._relinked = True
        return grad_norm, stepped

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module, optimizer) -> dict:
        return {"model": _DSModelState(model, self.cfg.zero_stage),
                "optim": _DSOptimState(model, optimizer, self.engine, self.group_fqns)}


class _DSModelState(Stateful):
    """{name: full fp32 tensor}: what ``get_model_state_dict`` gives for the plain model."""

    def __init__(self, model, stage: int):
        self.model, self.stage = model, stage

    def state_dict(self):
        from deepspeed.utils import safe_get_full_fp32_param

        # remove_duplicate=False: a tied weight under both its names, as get_model_state_dict gives it
        return {name: safe_get_full_fp32_param(p).detach().reshape(zero.full_shape(p)).clone().cpu()
                for name, p in self.model.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, sd):
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        params = dict(self.model.named_parameters())
        for name, p in params.items():
            value = sd[name].to(torch.float32)
            safe_set_full_fp32_param(p, value)  # the optimizer's fp32 master partition
            # ...and the module's (working-precision) weight
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    with torch.no_grad():
                        p.data.copy_(value.reshape(p.shape).to(p.dtype))
            else:
                with torch.no_grad():
                    p.data.copy_(value.reshape(p.shape).to(p.dtype))


class _DSOptimState(Stateful):
    """The AdamW state in ``get_optimizer_state_dict``'s layout: {"state": {name: {step,
    exp_avg, exp_avg_sq}}, "param_groups": [{"params": [names], hyper-parameters}]}."""

    def __init__(self, model, optimizer, engine, group_fqns: list[list[str]]):
        self.model, self.optimizer, self.engine, self.group_fqns = model, optimizer, engine, group_fqns

    def state_dict(self):
        zero.ensure_adam_state(self.engine, self.optimizer)  # the template of a load before step 1
        step = zero.adam_step_count(self.optimizer)
        state = {name: {"step": step.clone(), **{k: v.cpu() for k, v in zero.get_adam_moments(p).items()}}
                 for name, p in self.model.named_parameters()}
        return {"state": state, "param_groups": zero.named_param_groups(self.optimizer, self.group_fqns)}

    def load_state_dict(self, sd):
        zero.ensure_adam_state(self.engine, self.optimizer)
        step = None
        for name, p in self.model.named_parameters():
            entry = sd["state"].get(name)
            if entry is None:
                continue
            zero.set_adam_moments(p, entry)
            step = entry["step"]
        if step is not None:
            zero.set_adam_step_count(self.optimizer, step)
        zero.load_named_param_groups(self.optimizer, self.group_fqns, sd["param_groups"])
