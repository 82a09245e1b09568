"""The training job: ``mtp-train`` / ``python -m mtp_pretrain.train`` (a Hydra application).

One process, or one per rank under torchrun / srun / the deepspeed launcher; the parallelism
strategy is applied to the plain model and the loop below is the same for every strategy.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from mtp_pretrain.checkpoint import CheckpointManager
from mtp_pretrain.config import CONF_DIR, JobConfig, register_configs, to_job_config
from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.eval.per_head import per_head_sums
from mtp_pretrain.flops import device_peak_flops, training_flops_per_token
from mtp_pretrain.head_schedule import HeadWeights
from mtp_pretrain.loss import IGNORE_INDEX, head_targets, mtp_loss
from mtp_pretrain.metrics import MetricsLogger, peak_memory_mb
from mtp_pretrain.model import MTPTransformer, count_parameters
from mtp_pretrain.model.config import check_vocab
from mtp_pretrain.optim import build_adamw, build_scheduler, init_adamw_state
from mtp_pretrain.parallel import build_strategy, destroy_distributed, init_distributed
from mtp_pretrain.parallel.materialize import build_model

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after saving; run again to resume
EXIT_NONFINITE = 3


class NonFiniteLossError(RuntimeError):
    pass


class PreemptionFlag:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption or time-out) set a flag; the loop
    finishes its step, every rank agrees, a checkpoint is saved and the job exits."""

    def __init__(self):
        self.signal: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum
        # Once is enough. `scancel --signal=USR1 <job>` reaches a rank twice (from slurmstepd, and
        # forwarded by srun), and a repeat that lands while Python shuts down, which restores the
        # default action, would kill the rank (exit 138) in place of its exit 75 after the save.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)


def autocast_dtype(cfg: JobConfig, device: torch.device) -> Optional[torch.dtype]:
    if cfg.train.dtype == "bfloat16":
        return torch.bfloat16
    if cfg.train.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def freeze_next_token_path(model: MTPTransformer) -> int:
    """Freeze what the next-token prediction uses -- embeddings, trunk, head 1, unembedding -- so
    that only heads 2..n train; returns the number of parameters frozen. Frozen parameters get no
    gradient, the trunk no backward (the losses see an output without a graph), and the optimizer
    (built from parameters that require grad) no state for them."""
    frozen = {}
    for module in (model.tok_embeddings, *model.trunk, model.heads[0], model.unembed):
        for p in module.parameters():
            p.requires_grad_(False)
            frozen[id(p)] = p.numel()  # by id: a tied weight counts once
    return sum(frozen.values())


class Trainer:
    def __init__(self, cfg: JobConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # First, so that a preemption signal arriving during set-up is not lost.
        self.preemption = PreemptionFlag()
        self.env = init_distributed(cfg.train.device, cfg.parallel.timeout_s)
        self.amp_dtype = autocast_dtype(cfg, self.env.device)
        self.strategy = build_strategy(cfg.parallel, self.env, self.amp_dtype)
        self.strategy.validate(cfg.model, seq_len=cfg.data.seq_len)
        self.seq_len = cfg.data.seq_len
        n = cfg.model.n_future
        tokens_per_micro = cfg.train.micro_batch_size * self.seq_len * self.strategy.dp_size
        gbt = cfg.train.global_batch_tokens or tokens_per_micro
        if gbt % tokens_per_micro:
            raise ValueError(f"train.global_batch_tokens={gbt} must be a multiple of micro_batch_size x seq_len x "
                             f"data-parallel ranks = {tokens_per_micro}")
        self.grad_accum = gbt // tokens_per_micro
        if self.strategy.pipeline is not None:
            self.strategy.pipeline.validate(self.grad_accum)
        self.tokens_per_step = gbt

        self.train_stream = self._stream("train", infinite=True, prefetch=cfg.data.prefetch)
        check_vocab(cfg.model, self.train_stream.vocab_size)
        self.pad_id = self.train_stream.pad_id
        self.document_end_id = self.train_stream.eos_id if cfg.data.document_masking else None

        # Initial weights: a function of train.seed and each parameter's name (model/init.py), built
        # on the meta device and initialised shard by shard where the strategy shards parameters.
        self.model = build_model(cfg, self.strategy, self.env.device, self.log, self._freeze)
        self.param_counts = count_parameters(cfg.model)
        self.optimizer = self.strategy.build_optimizer(self.model, lambda m: build_adamw(m, cfg.optim))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.head_weights = HeadWeights(cfg.loss, n, cfg.train.max_steps)
        if not self.strategy.zero_optimizer:  # ZeRO keeps the state in its own partitions
            init_adamw_state(self.optimizer)
        torch.manual_seed(cfg.train.seed + 1000 * self.env.rank)

        self.ckpt = CheckpointManager(Path(cfg.checkpoint.dir or self.run_dir / "checkpoints"),
                                      cfg.checkpoint.keep, self.env, self.log)
        self.step, self.tokens_seen, self.nonfinite_in_a_row, self.nonfinite_total = 0, 0, 0, 0
        wandb_run_id = self._maybe_resume()
        self.metrics = MetricsLogger(self.run_dir, self.env.is_main, cfg.logging.wandb,
                                     OmegaConf.to_container(OmegaConf.structured(cfg)), wandb_run_id)
        self.flops_per_token = training_flops_per_token(cfg.model, self.seq_len)
        self.decode_prompts = self._decode_prompts()
        self.peak_flops = device_peak_flops(self.env.device, cfg.hardware.peak_flops)
        self.log(f"model {cfg.model.name}: n_future={n} head_type={cfg.model.head_type} "
                 + " ".join(f"{k}={v / 1e6:.2f}M" for k, v in self.param_counts.items()))
        self.log(f"strategy={self.strategy.name} world_size={self.env.world_size} {self.strategy.dims} "
                 f"device={self.env.device} dtype={self.amp_dtype or torch.float32} grad_accum={self.grad_accum} "
                 f"tokens/step={self.tokens_per_step} loss={cfg.loss.impl} run_dir={self.run_dir}")

    # --- set-up helpers --------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.env.is_main:
            print(f"[mtp] {msg}", flush=True)

    def _freeze(self, model: MTPTransformer) -> None:
        if self.cfg.train.freeze == "trunk":
            frozen = freeze_next_token_path(model)
            self.log(f"train.freeze=trunk: {frozen / 1e6:.2f}M parameters frozen (embeddings, trunk, head 1, "
                     f"unembedding); heads 2..{self.cfg.model.n_future} train")

    def _stream(self, split: str, infinite: bool, prefetch: int) -> ArrowTokenStream:
        return ArrowTokenStream(
            sources=[DataSource(path=s.path, weight=s.weight) for s in self.cfg.data.sources],
            window=self.seq_len + self.cfg.model.n_future, micro_batch_size=self.cfg.train.micro_batch_size,
            rank=self.strategy.dp_rank, world_size=self.strategy.dp_size, seed=self.cfg.train.seed,
            split=split, prefetch=prefetch, infinite=infinite)

    def _state(self) -> dict:
        return self.strategy.checkpoint_state(self.model, self.optimizer)

    def _maybe_resume(self) -> Optional[str]:
        resume = self.cfg.train.resume
        if resume == "never":
            return None
        verify = self.cfg.checkpoint.verify
        if resume == "auto":  # the newest undamaged checkpoint, if any
            if (found := self.ckpt.load_newest(self._state(), verify, self.cfg.model)) is None:
                return None
            path, state = found
        else:
            path = Path(resume)
            state = self.ckpt.load(path, self._state(), verify, self.cfg.model)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_stream.load_state_dict(state["data"])
        # The weights are a function of (step, tokens_seen), both restored above; a different
        # loss.weight_schedule / curriculum than the checkpoint's run is allowed but said.
        saved, now = state.get("next_head_weights"), self.head_weights.weights(self.step, self.tokens_seen)
        if saved is not None and saved != now:
            self.log(f"note: loss weights at step {self.step} are {now}; the run that saved the checkpoint "
                     f"would have used {saved} (loss.weight_schedule / loss.curriculum changed)")
        if state.get("world_size") != self.env.world_size:
            torch.manual_seed(self.cfg.train.seed + 1000 * self.env.rank + self.step)
        self.log(f"resumed from {path} at step {self.step} (saved with world_size={state.get('world_size')})")
        return state.get("wandb_run_id")

    def save_checkpoint(self) -> Path:
        train_state = {"step": self.step, "tokens_seen": self.tokens_seen, "nonfinite_total": self.nonfinite_total,
                       "scheduler": self.scheduler.state_dict(), "data": self.train_stream.state_dict(),
                       "next_head_weights": self.head_weights.weights(self.step, self.tokens_seen),
                       "wandb_run_id": self.metrics.wandb_run_id, "model_config": asdict(self.cfg.model),
                       "data_sources": [s.path for s in self.cfg.data.sources]}
        t0 = time.perf_counter()
        path = self.ckpt.save(self.step, self._state(), train_state)
        self.log(f"checkpoint step {self.step} -> {path} ({time.perf_counter() - t0:.1f}s, "
                 f"manifest {self.ckpt.last_manifest_s:.2f}s)")
        return path

    # --- the loop ---------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        autocast = (torch.autocast(self.env.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        weights = self.head_weights.weights(self.step, self.tokens_seen)
        batches = [next(self.train_iter).to(self.env.device, non_blocking=True) for _ in range(self.grad_accum)]
        # With document masking the step's target counts are needed before its first micro-batch:
        # each micro-batch's targets are built once, here, and handed to its loss.
        targets = None if self.document_end_id is None else [
            head_targets(tokens, self.seq_len, cfg.model.n_future, self.pad_id, self.document_end_id)
            for tokens in batches]
        denominators = None if targets is None else self._mean_target_counts(targets)

        def loss_of(micro, tokens, hooks, trunk_output=None):
            return mtp_loss(cfg.loss.impl, self.model, tokens, seq_len=self.seq_len, weights=weights,
                            chunk_size=cfg.loss.chunk_size, pad_id=self.pad_id, loss_scale=1.0 / self.grad_accum,
                            hooks=hooks, document_end_id=self.document_end_id, denominators=denominators,
                            trunk_output=trunk_output, targets=None if targets is None else targets[micro])

        per_head = self.strategy.forward_backward(self.model, batches, loss_of, autocast, self.seq_len,
                                                  self.document_end_id)
        self.strategy.finish_backward(self.model)
        per_head = self.strategy.all_reduce_mean(per_head.to(torch.float32)).double()
        # Heads at weight 0 were skipped (their per-head loss is NaN): they add nothing.
        loss = sum(w * float(l) for w, l in zip(weights, per_head) if w != 0)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm, stepped = self.strategy.step(self.model, self.optimizer, cfg.optim.grad_clip,
                                                loss_is_finite=math.isfinite(loss))
        if stepped:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log(f"step {self.step}: non-finite loss {loss} / grad norm {grad_norm}; step skipped "
                     f"({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step} "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); lower optim.lr or check the data")
        self.scheduler.step()
        return {"loss": loss, "per_head": per_head.tolist(), "weights": weights, "grad_norm": grad_norm, "lr": lr}

    def _decode_prompts(self) -> Optional[dict]:
        """Held-out prompts for validation decoding, or None where it is off or not measured."""
        cfg, n = self.cfg, self.cfg.model.n_future
        if not (cfg.logging.decode_prompts and cfg.logging.val_interval and n > 1):
            return None
        if not self.strategy.decodes:
            self.log(f"validation decoding (logging.decode_prompts) is not measured under parallel.strategy="
                     f"{self.strategy.name}: run mtp-generate on a checkpoint instead")
            return None
        from mtp_pretrain.decode_metrics import held_out_prompts, write_prompts

        prompts = held_out_prompts([s.path for s in cfg.data.sources], cfg.logging.decode_prompts,
                                   cfg.logging.decode_prompt_tokens, cfg.train.seed)
        if self.env.is_main:
            write_prompts(self.run_dir / "decode_prompts.json", prompts, n, cfg.logging.decode_new_tokens)
        return prompts

    def _mean_target_counts(self, targets: list[list[torch.Tensor]]) -> list[float]:
        """Per head, the step's valid targets per micro-batch (``targets``: each micro-batch's
        ``head_targets``), averaged over micro-batches and data-parallel ranks. Document masking
        drops a varying number of targets per micro-batch; dividing each one's summed loss by this
        mean (not its own count) makes the step's loss the mean over all its targets, whatever the
        number of ranks and micro-batches."""
        counts = torch.stack([torch.stack([(t != IGNORE_INDEX).sum() for t in heads]) for heads in targets])
        # Reduced where the counts live (NCCL reduces device tensors only), then one copy to the host.
        mean = self.strategy.all_reduce_mean(counts.sum(0).float()).double() / len(targets)
        return mean.clamp(min=1.0).tolist()

    @torch.no_grad()
    def validate(self) -> dict:
        t0 = time.perf_counter()
        stream = self._stream("val", infinite=False, prefetch=0)
        n = self.cfg.model.n_future
        # Top-1 accuracy needs full logits: not under tensor parallelism (vocab-sharded unembedding).
        accuracy = self.strategy.full_logits
        sums, correct, counts = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
        for k, tokens in enumerate(stream):
            if k >= self.cfg.logging.val_batches:
                break
            tokens = tokens.to(self.env.device)
            with self.strategy.loss_context():
                if accuracy:
                    s, ok, c = per_head_sums(self.model, tokens, seq_len=self.seq_len, pad_id=self.pad_id,
                                             document_end_id=self.document_end_id)
                    correct += ok
                else:
                    s, c = self.strategy.evaluate_loss(self.model, tokens, seq_len=self.seq_len,
                                                       chunk_size=self.cfg.loss.chunk_size, pad_id=self.pad_id,
                                                       document_end_id=self.document_end_id)
            sums += s
            counts += c
        self.strategy.release_gathered(self.model)
        both = self.strategy.all_reduce_mean(torch.cat([sums, correct, counts]).float()).double()
        mean, acc = both[:n] / both[2 * n:].clamp(min=1), both[n:2 * n] / both[2 * n:].clamp(min=1)
        out = {f"val/loss/head_{i + 1}": float(v) for i, v in enumerate(mean)} | {"val/loss": float(mean[0])}
        if accuracy:
            out |= {f"val/acc/head_{i + 1}": float(v) for i, v in enumerate(acc)}
        out["val/loss_s"] = time.perf_counter() - t0
        if self.decode_prompts is not None:
            decoded = self._decode()
            if decoded:
                out |= decoded | {"val/decode_cost": decoded["val/decode_s"] / out["val/loss_s"]}
        return out

    def _decode(self) -> dict:
        """Validation decoding on the main rank, on the strategy's whole model (every rank takes
        part: fsdp gathers a copy). Other ranks return {} (metrics are logged by the main rank)."""
        from mtp_pretrain.decode_metrics import measure_decoding

        model = self.strategy.full_model(self.model, self.cfg.model)
        if model is None:
            return {}
        return measure_decoding(model, self.decode_prompts, self.cfg.logging.decode_new_tokens)

    def train(self) -> int:
        cfg = self.cfg
        self.train_iter = iter(self.train_stream)
        start_step, t_last, tokens_last = self.step, time.perf_counter(), self.tokens_seen
        self.log(f"training steps {self.step}..{cfg.train.max_steps}")
        while self.step < cfg.train.max_steps:
            out = self.train_step()
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            if self.step % cfg.logging.interval == 0 or self.step == cfg.train.max_steps:
                now = time.perf_counter()
                self._log_step(out, (self.tokens_seen - tokens_last) / (now - t_last), start_step)
                t_last, tokens_last = now, self.tokens_seen
            # Validation and checkpoint time is kept out of the next tokens_per_s (training throughput).
            if cfg.logging.val_interval and self.step % cfg.logging.val_interval == 0:
                paused = time.perf_counter()
                self._log_val()
                t_last += time.perf_counter() - paused
            preempted = self._preempted()
            if preempted or self.step == cfg.train.max_steps or (
                    cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                paused = time.perf_counter()
                self.save_checkpoint()
                t_last += time.perf_counter() - paused
            if preempted:
                self.log(f"received {signal.Signals(preempted).name}: checkpoint saved at step {self.step}; "
                         f"exiting with code {EXIT_PREEMPTED} so the job can be requeued")
                return EXIT_PREEMPTED
        if cfg.logging.val_interval and self.step % cfg.logging.val_interval:
            self._log_val()
        self.log(f"done: {self.step} steps, {self.tokens_seen} tokens; metrics in {self.run_dir / 'metrics.jsonl'}"
                 + (f"; wandb run in {self.metrics.wandb_dir}" if self.metrics.wandb_dir else ""))
        return 0

    def _preempted(self) -> int:
        flag = torch.tensor([float(self.preemption.signal or 0)])
        return int(self.strategy.all_reduce_max(flag).item())

    def _log_step(self, out: dict, tokens_per_s: float, start_step: int) -> None:
        m = {"step": self.step, "loss": out["loss"], "lr": out["lr"], "grad_norm": out["grad_norm"],
             "tokens_per_s": tokens_per_s, "tokens_per_s_per_rank": tokens_per_s / self.env.world_size,
             "peak_mem_mb": peak_memory_mb(self.env.device), "tokens_seen": self.tokens_seen,
             "nonfinite_skipped": self.nonfinite_total}
        m |= {f"loss/head_{i + 1}": v for i, (v, w) in enumerate(zip(out["per_head"], out["weights"])) if w != 0}
        m |= {f"loss/weight/head_{i + 1}": w for i, w in enumerate(out["weights"])}
        if self.peak_flops:
            m["mfu"] = tokens_per_s / self.env.world_size * self.flops_per_token / self.peak_flops
        heads = " ".join(f"{v:.3f}" if w != 0 else "-" for v, w in zip(out["per_head"], out["weights"]))
        remaining = (self.cfg.train.max_steps - self.step) * self.tokens_per_step / max(tokens_per_s, 1e-9)
        line = (f"step {self.step:>6}/{self.cfg.train.max_steps} loss {out['loss']:.4f} heads [{heads}] "
                f"lr {out['lr']:.2e} gnorm {out['grad_norm']:.2f} {tokens_per_s:,.0f} tok/s "
                f"mem {m['peak_mem_mb']:.0f}MB eta {remaining / 60:.1f}min")
        self.metrics.log(m, console=line)

    def _log_val(self) -> None:
        v = self.validate()
        shown = " ".join(f"{k.split('/')[-1]}={x:.4f}" for k, x in v.items() if k.startswith("val/loss/head"))
        if "val/accept_per_forward" in v:
            shown += (f" accept/forward={v['val/accept_per_forward']:.3f} (decode {v['val/decode_s']:.1f}s = "
                      f"{100 * v['val/decode_cost']:.0f}% of the {v['val/loss_s']:.1f}s loss pass)")
        self.metrics.log({"step": self.step, **v}, console=f"step {self.step:>6} validation {shown}")

    def close(self) -> None:
        self.metrics.close()
        self.train_stream.close() if hasattr(self.train_stream, "close") else None
        destroy_distributed()


def run(cfg: JobConfig, run_dir: Path) -> int:
    trainer = Trainer(cfg, run_dir)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _run_id() -> str:
    """Same on every rank of one job: $MTP_RUN_ID, torchrun's run id, the SLURM job id, else time."""
    for var in ("MTP_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(var):
            return os.environ[var] if var == "MTP_RUN_ID" else f"slurm-{os.environ[var]}"
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID'][:8]}"
    return time.strftime("%Y%m%d-%H%M%S")


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    if not OmegaConf.has_resolver("run_id"):
        OmegaConf.register_new_resolver("run_id", _run_id, use_cache=True)

    # An absolute path: the package's own conf/ wherever it is installed. Users add their own
    # config directories with --config-dir or hydra.searchpath (README cookbook).
    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def _app(dict_cfg) -> None:
        cfg = to_job_config(dict_cfg)
        try:
            code = run(cfg, Path(HydraConfig.get().runtime.output_dir))
        except NonFiniteLossError as e:  # every rank sees the same all-reduced loss: all stop here
            print(f"[mtp] error: {e}", file=sys.stderr, flush=True)
            code = EXIT_NONFINITE
        if code:
            sys.exit(code)

    _app()


if __name__ == "__main__":
    main()
