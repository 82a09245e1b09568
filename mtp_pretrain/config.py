"""The job's typed configuration: one dataclass per component, validated once at start-up.

Hydra composes ``mtp_pretrain/conf/`` onto these dataclasses (registered in its ConfigStore as the schema),
so an unknown key fails at composition and a bad value fails in ``__post_init__`` with the
field's dotted name, before anything expensive happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from mtp_pretrain.model.config import ModelConfig

# The shipped configs: package data, so an installed copy has them too (``pip install .``).
CONF_DIR = Path(__file__).resolve().parent / "conf"


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _at_least(name: str, value: Any, low: float) -> None:
    if not isinstance(value, (int, float)) or value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


FREEZE_STRATEGIES = ("none", "ddp", "fsdp")
PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")  # where train.freeze=trunk is implemented and tested
WEIGHT_PRESETS = ("uniform", "harmonic", "exponential")
WEIGHT_SCHEDULES = ("constant", "step", "linear", "cosine")


@dataclass
class HeadWeightScheduleConfig:
    """Per-head loss weights over training (mtp_pretrain/head_schedule.py, docs/mtp_controls.md).

    Each end of the schedule is a vector with one weight per head: ``from_weights`` /
    ``to_weights`` if given, else head 1 = 1 and head i > 1 = scale x the preset's shape."""

    kind: str = "constant"  # constant (the from vector) | step | linear | cosine
    unit: str = "step"  # what begin/end count: step (optimizer steps) | tokens (tokens seen)
    begin: int = 0  # step: where the to vector takes over; linear/cosine: where the anneal starts
    end: int = 0  # linear/cosine: where the anneal reaches the to vector
    preset: str = "uniform"  # extra heads relative to head 1: uniform (1) | harmonic (1/i) | exponential (gamma^(i-1))
    gamma: float = 0.5  # exponential preset's base
    from_scale: float = 1.0  # extra heads' weight scale at the start (e.g. 0.3)
    to_scale: float = 1.0  # ... and after the change (e.g. 0.1)
    from_weights: Optional[list[float]] = None  # explicit vector instead of preset x from_scale
    to_weights: Optional[list[float]] = None  # explicit vector instead of preset x to_scale

    def __post_init__(self):
        _choice("loss.weight_schedule.kind", self.kind, WEIGHT_SCHEDULES)
        _choice("loss.weight_schedule.unit", self.unit, ("step", "tokens"))
        _choice("loss.weight_schedule.preset", self.preset, WEIGHT_PRESETS)
        _at_least("loss.weight_schedule.begin", self.begin, 0)
        _at_least("loss.weight_schedule.end", self.end, 0)
        _at_least("loss.weight_schedule.from_scale", self.from_scale, 0.0)
        _at_least("loss.weight_schedule.to_scale", self.to_scale, 0.0)
        if not (isinstance(self.gamma, (int, float)) and self.gamma > 0):
            raise ValueError(f"loss.weight_schedule.gamma must be > 0, got {self.gamma!r}")
        if self.kind in ("linear", "cosine") and self.end <= self.begin:
            raise ValueError(f"loss.weight_schedule: kind={self.kind} anneals from begin to end, so end must be > "
                             f"begin; got begin={self.begin}, end={self.end}")
        for name in ("from_weights", "to_weights"):
            vec = getattr(self, name)
            if vec is not None and any(not isinstance(w, (int, float)) or w < 0 for w in vec):
                raise ValueError(f"loss.weight_schedule.{name} must hold weights >= 0, got {list(vec)}")


@dataclass
class LossConfig:
    impl: str = "head_sequential"  # head_sequential | naive
    chunk_size: int = 0  # tokens per cross-entropy chunk; 0 = whole micro-batch at once
    head_weights: Optional[list[float]] = None  # a constant vector (one per head); None = weight_schedule
    weight_schedule: HeadWeightScheduleConfig = field(default_factory=HeadWeightScheduleConfig)
    # none | forward (head 1 alone first, one more head at each boundary) | reverse (every head first,
    # the last one still on turned off at each boundary). Heads that are off weigh 0 and are skipped.
    curriculum: str = "none"
    curriculum_steps: Optional[list[int]] = None  # n_future - 1 increasing steps; None = evenly spread

    def __post_init__(self):
        _choice("loss.impl", self.impl, ("head_sequential", "naive"))
        _at_least("loss.chunk_size", self.chunk_size, 0)
        _choice("loss.curriculum", self.curriculum, ("none", "forward", "reverse"))
        if self.head_weights is not None:
            if any(not isinstance(w, (int, float)) or w < 0 for w in self.head_weights):
                raise ValueError(f"loss.head_weights must hold weights >= 0, got {list(self.head_weights)}")
            if self.weight_schedule != HeadWeightScheduleConfig():
                raise ValueError("set either loss.head_weights (a constant vector) or loss.weight_schedule, not both")
        if self.curriculum_steps is not None:
            steps = list(self.curriculum_steps)
            if any(not isinstance(s, int) or s < 1 for s in steps) or steps != sorted(set(steps)):
                raise ValueError(f"loss.curriculum_steps must be strictly increasing steps >= 1, got {steps}")


@dataclass
class DataSourceConfig:
    path: str = "data/default/code"
    weight: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"data.sources[].weight must be > 0, got {self.weight!r} for {self.path}")


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig()])
    seq_len: int = 256  # model input length; samples are seq_len + n_future tokens
    prefetch: int = 2  # micro-batches prepared ahead in a background thread
    # Packed windows: attention, rotary positions and every head's targets stay inside each
    # document (documents end with the tokenizer's EOS). Off = plain concatenation.
    document_masking: bool = True

    def __post_init__(self):
        if not self.sources:
            raise ValueError("data.sources must name at least one dataset")
        _at_least("data.seq_len", self.seq_len, 1)
        _at_least("data.prefetch", self.prefetch, 0)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: float = 0.1  # decoupled (AdamW); never on norms and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: final fraction of steps spent decaying
    grad_clip: float = 1.0  # max global grad norm; 0 = off

    def __post_init__(self):
        _at_least("optim.lr", self.lr, 0.0)
        _choice("optim.schedule", self.schedule, ("cosine", "wsd", "constant"))
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _at_least("optim.grad_clip", self.grad_clip, 0.0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two entries, got {self.betas}")


@dataclass
class TrainConfig:
    seed: int = 1234
    max_steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per forward
    # Tokens per optimizer step over all ranks; gradient accumulation = this /
    # (micro_batch_size * seq_len * data-parallel ranks). None = one micro-batch per rank.
    global_batch_tokens: Optional[int] = None
    resume: str = "auto"  # auto (newest complete checkpoint in checkpoint.dir) | never | <path>
    init_from: Optional[str] = None  # weights only, from a checkpoint or export directory
    # weights only, from a local Hugging Face Llama directory (docs/interop.md); heads 2..n from its
    # mtp side file if present, else per init_from_hf_heads: copy (of head 1) | fresh
    init_from_hf: Optional[str] = None
    init_from_hf_heads: str = "copy"
    dtype: str = "auto"  # auto (bf16 autocast where supported, else fp32) | float32 | bfloat16
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    device: str = "auto"  # auto | cpu | cuda
    # none | trunk: heads-only training. Embeddings, trunk, head 1 and the unembedding stay frozen
    # (no gradient, no optimizer state); only heads 2..n train (docs/mtp_controls.md).
    freeze: str = "none"

    def __post_init__(self):
        _at_least("train.max_steps", self.max_steps, 1)
        _choice("train.freeze", self.freeze, ("none", "trunk"))
        _at_least("train.micro_batch_size", self.micro_batch_size, 1)
        if self.global_batch_tokens is not None:
            _at_least("train.global_batch_tokens", self.global_batch_tokens, 1)
        _choice("train.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _at_least("train.max_nonfinite_steps", self.max_nonfinite_steps, 1)
        _choice("train.init_from_hf_heads", self.init_from_hf_heads, ("copy", "fresh"))
        if self.init_from and self.init_from_hf:
            raise ValueError("set at most one of train.init_from and train.init_from_hf")
        if not self.resume:
            raise ValueError("train.resume must be 'auto', 'never' or a checkpoint path")


@dataclass
class ParallelConfig:
    strategy: str = "none"  # none | ddp | fsdp | tp | fsdp_tp | deepspeed | megatron
    tp_size: int = 1
    pp_size: int = 1  # pipeline stages (parallel/layout.py: rank order pp, dp, tp)
    zero_stage: int = 0  # deepspeed: 1-3; megatron: 0-2
    activation_checkpointing: str = "none"  # none | full | every_k
    ac_every: int = 2  # every_k: checkpoint every k-th block
    compile: bool = False
    cpu_offload: bool = False  # fsdp: keep sharded parameters and optimizer state on CPU
    # fsdp, tp, fsdp_tp, megatron, deepspeed ZeRO-3, pipeline stages: build on the meta device, shard,
    # then initialise each rank's shards only (false: the whole model on every rank's host first;
    # same initial weights either way; parallel/materialize.py)
    meta_init: bool = True
    timeout_s: int = 600  # collective timeout: a dead rank fails the job instead of hanging it
    # Pipeline parallelism (mtp_pretrain/parallel/pipeline.py): composes with none, fsdp, tp and
    # fsdp_tp. Micro-batches are the gradient accumulation's (train.global_batch_tokens /
    # train.micro_batch_size / seq_len / dp ranks).
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b (pp_virtual_stages per rank) | zbv
    pp_virtual_stages: int = 2  # interleaved_1f1b: stages per rank (zbv: always 2)
    # Trunk blocks of each stage, first to last (pp_size x stages per rank entries, summing to the
    # trunk's blocks); None = an even split. Embedding on the first stage, heads on the last.
    pp_layout: Optional[list[int]] = None

    def __post_init__(self):
        _choice("parallel.strategy", self.strategy,
                ("none", "ddp", "fsdp", "tp", "fsdp_tp", "deepspeed", "megatron"))
        _at_least("parallel.tp_size", self.tp_size, 1)
        _at_least("parallel.pp_size", self.pp_size, 1)
        _choice("parallel.pp_schedule", self.pp_schedule, PP_SCHEDULES)
        _at_least("parallel.pp_virtual_stages", self.pp_virtual_stages, 1)
        if self.pp_schedule == "interleaved_1f1b" and self.pp_virtual_stages < 2:
            raise ValueError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.pp_virtual_stages >= 2, "
                             f"got {self.pp_virtual_stages} (use 1f1b for one stage per rank)")
        if self.pp_layout is not None:
            stages = self.pp_size * self.pp_stages_per_rank
            if len(self.pp_layout) != stages:
                raise ValueError(f"parallel.pp_layout has {len(self.pp_layout)} entries; parallel.pp_size="
                                 f"{self.pp_size} with pp_schedule={self.pp_schedule} has {stages} stages")
            if any(not isinstance(k, int) or k < 0 for k in self.pp_layout) or any(
                    k == 0 for k in self.pp_layout[1:-1]):
                raise ValueError(f"parallel.pp_layout={list(self.pp_layout)}: every entry must be a block count "
                                 f">= 0, and >= 1 for a middle stage (only the first and last stages hold "
                                 f"something else)")

    @property
    def pp_stages_per_rank(self) -> int:
        return {"interleaved_1f1b": self.pp_virtual_stages, "zbv": 2}.get(self.pp_schedule, 1)
        _choice("parallel.activation_checkpointing", self.activation_checkpointing, ("none", "full", "every_k"))
        _at_least("parallel.ac_every", self.ac_every, 1)
        _at_least("parallel.timeout_s", self.timeout_s, 1)


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default <run_dir>/checkpoints
    interval: int = 100  # steps between checkpoints; 0 = only at the end and on signals
    keep: int = 2  # newest complete checkpoints kept (>= 2: the newest may still be in flight)
    # What resume checks against the checkpoint's manifest before loading: size (every file's
    # size; instant) | checksum (also every file's crc32: reads the whole checkpoint once).
    # A failed load is always followed by the checksum check, to name the damaged file.
    verify: str = "size"

    def __post_init__(self):
        _at_least("checkpoint.interval", self.interval, 0)
        _at_least("checkpoint.keep", self.keep, 1)
        _choice("checkpoint.verify", self.verify, ("size", "checksum"))


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "mtp_pretrain"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("logging.wandb.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between metric lines
    val_interval: int = 100  # steps between validation passes; 0 = off
    val_batches: int = 8  # micro-batches per rank per validation pass
    # At each validation: greedy self-speculative decoding of this many held-out prompts per
    # validation source (0 = off), logging val/accept_per_forward (mtp_pretrain/decode_metrics.py).
    decode_prompts: int = 4
    decode_new_tokens: int = 64  # tokens generated per prompt (no EOS stop: a fixed budget)
    decode_prompt_tokens: int = 64  # prompt length, taken from the start of a validation window
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        _at_least("logging.interval", self.interval, 1)
        _at_least("logging.decode_prompts", self.decode_prompts, 0)
        _at_least("logging.decode_new_tokens", self.decode_new_tokens, 1)
        _at_least("logging.decode_prompt_tokens", self.decode_prompt_tokens, 1)
        _at_least("logging.val_interval", self.val_interval, 0)
        _at_least("logging.val_batches", self.val_batches, 1)


@dataclass
class HardwareConfig:
    # Peak dense FLOP/s of one device for MFU; None = look up the device in mtp_pretrain.flops.
    peak_flops: Optional[float] = None


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)

    def __post_init__(self):
        window = self.data.seq_len
        if window > self.model.max_seq_len:
            raise ValueError(f"data.seq_len={window} exceeds model.max_seq_len={self.model.max_seq_len} (the RoPE limit)")
        gbt, micro = self.train.global_batch_tokens, self.train.micro_batch_size * self.data.seq_len
        if gbt is not None and gbt % micro:  # the data-parallel world size is checked at start-up
            raise ValueError(f"train.global_batch_tokens={gbt} must be a multiple of train.micro_batch_size x "
                             f"data.seq_len = {micro} (times the data-parallel ranks)")
        n = self.model.n_future
        ws = self.loss.weight_schedule
        for name, vec in (("loss.head_weights", self.loss.head_weights),
                          ("loss.weight_schedule.from_weights", ws.from_weights),
                          ("loss.weight_schedule.to_weights", ws.to_weights)):
            if vec is not None and len(vec) != n:
                raise ValueError(f"{name} has {len(vec)} entries but model.n_future is {n}")
        if self.train.freeze == "trunk" and n < 2:
            raise ValueError("train.freeze=trunk trains heads 2..n only: it needs model.n_future >= 2, got 1")
        strategy = self.parallel.strategy
        if self.parallel.pp_size > 1:
            self._check_pipeline()
        if self.train.freeze != "none" and strategy not in FREEZE_STRATEGIES:
            raise ValueError(f"train.freeze={self.train.freeze} is not supported with parallel.strategy={strategy}; "
                             f"use one of {', '.join(FREEZE_STRATEGIES)}")
        if self.model.share_extra_heads and strategy not in ("none", "ddp"):
            # A sharded strategy would shard the one shared head once per depth.
            raise ValueError(f"model.share_extra_heads is not supported with parallel.strategy={strategy}; "
                             f"use none or ddp")
        if self.loss.curriculum != "none" and strategy in ("deepspeed", "megatron"):
            # ZeRO's flat partitions expect a gradient for every parameter at every step.
            raise ValueError(f"loss.curriculum={self.loss.curriculum} is not supported with parallel.strategy="
                             f"{strategy}; use none, ddp, fsdp, tp or fsdp_tp")
        if self.loss.curriculum != "none":
            if n < 2:
                raise ValueError(f"loss.curriculum={self.loss.curriculum} needs model.n_future >= 2, got {n}")
            steps = self.loss.curriculum_steps
            if steps is not None and len(steps) != n - 1:
                raise ValueError(f"loss.curriculum_steps has {len(steps)} boundaries; model.n_future={n} needs "
                                 f"n_future - 1 = {n - 1}")


    def _check_pipeline(self) -> None:
        par, trunk = self.parallel, self.model.trunk_layers
        stages = par.pp_size * par.pp_stages_per_rank
        if par.pp_layout is not None:
            if sum(par.pp_layout) != trunk:
                raise ValueError(f"parallel.pp_layout={list(par.pp_layout)} places {sum(par.pp_layout)} trunk blocks; "
                                 f"the model has {trunk} (model.trunk_layers)")
        elif trunk % stages:
            raise ValueError(f"{trunk} trunk blocks (model.trunk_layers) do not divide evenly into {stages} pipeline "
                             f"stages (parallel.pp_size={par.pp_size}, pp_schedule={par.pp_schedule}); set "
                             f"parallel.pp_layout to a list of {stages} block counts")
        if self.train.freeze != "none":
            raise ValueError(f"train.freeze={self.train.freeze} is not supported with parallel.pp_size > 1")


def register_configs() -> None:
    """Make JobConfig the schema under conf/config.yaml (its defaults list names it first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=job_schema())


def job_schema():
    """JobConfig as an OmegaConf schema, with fields whose declared default is None kept None.

    OmegaConf builds the nested defaults by calling the default factories, which runs their
    ``__post_init__``: ModelConfig() fills ``n_kv_heads`` and ``ffn_dim`` from its own default
    shape (4 and 384). Left in the schema, those would be inherited by every conf/model/*.yaml
    that does not set them (124m and 7b silently got 4 KV heads, small failed to compose, a
    ``model.dim`` override kept ffn_dim 384); reset, they are derived from the composed shape.
    """
    import dataclasses

    schema = OmegaConf.structured(JobConfig)

    def reset(node, cls) -> None:
        for f in dataclasses.fields(cls):
            child = node[f.name]
            if f.default is None:
                node[f.name] = None
            elif OmegaConf.is_dict(child) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
                reset(child, OmegaConf.get_type(child))

    reset(schema, JobConfig)
    return schema


def to_job_config(cfg) -> JobConfig:
    """Hydra's DictConfig -> validated JobConfig (runs every __post_init__)."""
    if isinstance(cfg, JobConfig):
        return cfg
    # A key added with Hydra's "+key=value" escapes the schema's struct flag, and to_object drops
    # it without a word: reject it here instead of training with a silently ignored setting.
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)} (not fields of JobConfig; see "
                         f"mtp_pretrain/conf/ and mtp_pretrain/config.py)")
    return OmegaConf.to_object(cfg)


def unknown_keys(node, prefix: str = "") -> list[str]:
    """Dotted names of keys of ``node`` (a DictConfig typed by a dataclass) that are not fields."""
    import dataclasses

    cls = OmegaConf.get_type(node)
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    out = []
    for key in node.keys():
        if names is not None and key not in names:
            out.append(f"{prefix}{key}")
            continue
        child = node._get_node(key)
        if OmegaConf.is_dict(child):
            out += unknown_keys(child, f"{prefix}{key}.")
        elif OmegaConf.is_list(child):
            for i in range(len(child)):
                item = child._get_node(i)
                if OmegaConf.is_dict(item):
                    out += unknown_keys(item, f"{prefix}{key}[{i}].")
    return out


def compose_job_config(overrides: list[str] | tuple = ()) -> JobConfig:
    """Compose mtp_pretrain/conf/ with overrides outside a Hydra app (tests, tools)."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_job_config(compose(config_name="config", overrides=list(overrides)))
