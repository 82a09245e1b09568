"""DeepSpeed ZeRO stage 1 / 2 / 3 (``parallel.strategy=deepspeed parallel.zero_stage=N``).

``deepspeed.initialize`` wraps the plain model and the AdamW built by ``mtp_pretrain.optim``; the
engine's config is generated from the Hydra config (``ds_config``): fp32 or bf16 from
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
(``zero_engine_step``), so a step means what it means under every other strategy.

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
import warnings
from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.optim import group_param_names

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# DeepSpeed 0.19 still calls the collectives torch 2.13 renamed: one warning per call otherwise.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)"
                        r"` is deprecated")


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


def ds_config(stage: int, param_dtype: torch.dtype | None, grad_clip: float = 0.0) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the Trainer owns batching
        "gradient_accumulation_steps": 1,  # the Trainer accumulates; one engine step per optimizer step
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
            "reduce_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 0,  # partition every parameter under ZeRO-3
        },
        # check_grad_overflow: skip a bf16 step with a non-finite gradient norm, as fp32 does.
        "bf16": {"enabled": param_dtype == torch.bfloat16, "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


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


def zero_engine_step(engine, model: nn.Module, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
    """``Strategy.step`` for a DeepSpeed ZeRO engine, which owns clipping, the update and the
    reduced gradients. It skips a step itself when the gradient norm is non-finite (its overflow
    check, on for fp32 and, by ``ds_config``, bf16), discarding the reduced gradients; a
    non-finite loss is sent down that same path by marking one gradient NaN (DeepSpeed's public
    ``safe_set_full_grad``). Returns (DeepSpeed's pre-clip global norm, whether it stepped)."""
    from deepspeed.utils import safe_set_full_grad

    engine.optimizer.clip_grad = max_norm if max_norm > 0 else 0.0
    if not loss_is_finite:
        first = next(p for p in model.parameters() if p.requires_grad)
        safe_set_full_grad(first, torch.full(_full_shape(first), float("nan"), device=first.device))
    skipped = engine.skipped_steps
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan"), engine.skipped_steps == skipped


class DeepSpeedGradSync(GradSyncHooks):
    """Nothing per head: the whole step is one coalesced reduction (see the module docstring)."""


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"

    def __init__(self, cfg, env, param_dtype: torch.dtype | None = None):
        super().__init__(cfg, env)
        self.param_dtype = param_dtype
        self.engine = None
        self._coalesce: contextlib.ExitStack | None = None

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        if self.cfg.zero_stage not in (1, 2, 3):
            raise ValueError(f"parallel.zero_stage must be 1, 2 or 3 for parallel.strategy=deepspeed, "
                             f"got {self.cfg.zero_stage}")
        if self.cfg.tp_size != 1:
            raise ValueError(f"parallel.strategy=deepspeed does not combine with tensor parallelism here "
                             f"(parallel.tp_size={self.cfg.tp_size}); use fsdp_tp")
        if self.cfg.cpu_offload:
            raise ValueError("parallel.cpu_offload is an fsdp option; DeepSpeed offload is not wired up")
        deepspeed = import_deepspeed(self.env.device.type)
        if not hasattr(deepspeed.DeepSpeedEngine, "coalesce_grad_reduction"):
            raise RuntimeError(f"parallel.strategy=deepspeed needs DeepSpeedEngine.coalesce_grad_reduction "
                               f"(DeepSpeed >= 0.19); this is {deepspeed.__version__}")
        if model_cfg.tie_embeddings and self.cfg.zero_stage == 3:
            raise ValueError("model.tie_embeddings with ZeRO-3 is untested here; use zero_stage 1/2 or fsdp")

    def build_optimizer(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        deepspeed = import_deepspeed(self.env.device.type)
        _ensure_process_group(self.env)
        optimizer = make_optimizer(model)
        self.group_fqns = group_param_names(model, optimizer)  # before ZeRO flattens the groups
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config(self.cfg.zero_stage, self.param_dtype),
            dist_init_required=False)
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
        grad_norm, stepped = zero_engine_step(self.engine, model, max_norm, loss_is_finite)
        if not getattr(self, "_relinked", False):
            _link_optimizer_state(self.engine)
            self._relinked = True
        return grad_norm, stepped

    # --- checkpoints ---------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module, optimizer) -> dict:
        return {"model": _DSModelState(model, self.cfg.zero_stage),
                "optim": _DSOptimState(model, optimizer, self.engine, self.group_fqns)}


def _link_optimizer_state(engine) -> None:
    """ZeRO-1/2 link each parameter to its slice of the AdamW moments after the first step() --
    but after the *first param group's* step, before the second group has any state, so the
    second group (norms, embeddings, unembedding) stays unlinked (DeepSpeed 0.19.8). Link again
    once every group has state."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _ensure_adam_state(engine, optimizer) -> None:
    """Give every (flat, partitioned) parameter of the wrapped AdamW its state -- zeros, step 0 --
    so that a checkpoint can be loaded into it before the first step."""
    created = False
    # ZeRO-3 empties the groups between steps; its flat fp32 partitions are the AdamW params
    flat = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    for p in flat or [p for group in optimizer.param_groups for p in group["params"]]:
        if not optimizer.state.get(p):
            optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
            created = True
    if created:
        _link_optimizer_state(engine)


def _full_shape(p) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


class _DSModelState(Stateful):
    """{name: full fp32 tensor}: what ``get_model_state_dict`` gives for the plain model."""

    def __init__(self, model, stage: int):
        self.model, self.stage = model, stage

    def state_dict(self):
        from deepspeed.utils import safe_get_full_fp32_param

        # remove_duplicate=False: a tied weight under both its names, as get_model_state_dict gives it
        return {name: safe_get_full_fp32_param(p).detach().reshape(_full_shape(p)).clone().cpu()
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

    def _step(self) -> torch.Tensor:
        for st in self.optimizer.state.values():
            if "step" in st:
                return torch.as_tensor(st["step"], dtype=torch.float32).clone().cpu()
        return torch.tensor(0.0)

    def state_dict(self):
        from deepspeed.utils import safe_get_full_optimizer_state

        _ensure_adam_state(self.engine, self.optimizer)  # the template of a load before step 1
        step = self._step()
        state = {}
        for name, p in self.model.named_parameters():
            entry = {"step": step.clone()}
            for key in ADAM_KEYS:
                v = safe_get_full_optimizer_state(p, key)
                entry[key] = (torch.zeros(_full_shape(p)) if v is None else v.detach().reshape(_full_shape(p))).cpu()
            state[name] = entry
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(fqns)}
                  for g, fqns in zip(self.optimizer.param_groups, self.group_fqns)]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd):
        from deepspeed.utils import safe_set_full_optimizer_state

        _ensure_adam_state(self.engine, self.optimizer)
        step = None
        for name, p in self.model.named_parameters():
            entry = sd["state"].get(name)
            if entry is None:
                continue
            for key in ADAM_KEYS:
                safe_set_full_optimizer_state(p, entry[key].to(torch.float32).reshape(-1), key)
            step = entry["step"]
        if step is not None:
            for st in self.optimizer.state.values():
                if "step" in st:
                    st["step"] = torch.as_tensor(step, dtype=torch.float32).clone().reshape(st["step"].shape) \
                        if torch.is_tensor(st["step"]) else float(step)
        for g, saved in zip(self.optimizer.param_groups, sd.get("param_groups", [])):
            for k, v in saved.items():
                if k not in ("params",) and k in g:
                    g[k] = v
