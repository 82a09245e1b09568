"""The job's configuration: every YAML in mtp_pretrain/conf/ composes into a valid JobConfig, and invalid
configs fail at composition, fast, naming the offending field, before any data or model work."""

from __future__ import annotations

import subprocess
import time

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from conftest import REPO, cli_command, _env
from mtp_pretrain.config import CONF_DIR, JobConfig, compose_job_config

JOB_GROUPS = {"model", "data", "optim", "parallel", "logging"}  # the defaults list of conf/config.yaml


def job_groups() -> dict[str, list[str]]:
    """The JobConfig groups of conf/ (hydra/ holds Hydra's own groups) and their options."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(CONF_DIR.iterdir()) if d.is_dir() and d.name != "hydra"}


def test_conf_layout_is_known():
    groups = job_groups()
    assert set(groups) == JOB_GROUPS, "a new conf/ group: add it to JOB_GROUPS and docs/training.md"
    assert {"tiny", "small", "124m", "1b", "7b"} <= set(groups["model"])
    assert {"none", "ddp", "fsdp"} <= set(groups["parallel"])


def test_default_config_composes():
    cfg = compose_job_config()
    assert isinstance(cfg, JobConfig)
    assert (cfg.model.name, cfg.parallel.strategy, cfg.loss.impl) == ("tiny", "none", "head_sequential")
    assert cfg.model.n_future == 4 and cfg.train.resume == "auto"


def assert_written(written, composed, where: str) -> None:
    """Every value written in the YAML is the composed value (composed may have more keys)."""
    if isinstance(written, dict):
        assert isinstance(composed, dict), where
        for k, v in written.items():
            assert k in composed, f"{where}.{k} is not a JobConfig field"
            assert_written(v, composed[k], f"{where}.{k}")
    elif isinstance(written, list):
        assert isinstance(composed, list) and len(written) == len(composed), where
        for i, (w, c) in enumerate(zip(written, composed)):
            assert_written(w, c, f"{where}[{i}]")
    elif isinstance(composed, float) and not isinstance(written, bool):
        assert float(written) == composed, where
    else:
        assert written == composed, where


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in job_groups().items() for o in opts])
def test_every_group_option_composes(group, option):
    """Every conf/<group>/<option>.yaml gives a valid JobConfig (all __post_init__ checks pass)
    and every value it writes takes effect."""
    cfg = compose_job_config([f"{group}={option}"])
    assert isinstance(cfg, JobConfig)
    written = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    written.pop("defaults", None)
    assert written, f"conf/{group}/{option}.yaml is empty"
    assert_written(written, OmegaConf.to_container(OmegaConf.structured(cfg))[group], group)


@pytest.mark.parametrize("path", sorted(p.relative_to(CONF_DIR / "hydra") for p in (CONF_DIR / "hydra").rglob("*.yaml"))
                         if (CONF_DIR / "hydra").is_dir() else [])
def test_hydra_group_options_compose(path):
    """conf/hydra/<group>/<option>.yaml (e.g. the SLURM launcher) compose with the job config."""
    from hydra import compose, initialize_config_dir

    from mtp_pretrain.config import register_configs, to_job_config

    group, option = str(path.parent), path.stem
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        # hydra-submitit-launcher is a dev dependency: a missing plugin fails here, never skips.
        cfg = compose(config_name="config", overrides=[f"hydra/{group}={option}"], return_hydra_config=True)
    assert cfg.hydra[group] is not None
    with open_dict(cfg):
        del cfg["hydra"]
    assert isinstance(to_job_config(cfg), JobConfig)


BAD = [
    # (overrides, text that must appear in the error: the field's dotted name)
    (["train.no_such_key=1"], "no_such_key"),
    (["+train.no_such_key=1"], "train.no_such_key"),
    (["+no_such_group.x=1"], "no_such_group"),
    (["data.sources=[{path:/x,wieght:1}]"], "wieght"),
    (["loss.impl=fused"], "loss.impl"),
    (["model.n_future=0"], "model.n_future"),
    (["data.seq_len=4096"], "data.seq_len"),  # tiny: max_seq_len 1024
    (["train.micro_batch_size=2", "data.seq_len=32", "train.global_batch_tokens=100"], "train.global_batch_tokens"),
    (["model.head_type=mlp"], "model.head_type"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["parallel.strategy=zero"], "parallel.strategy"),
    (["loss.head_weights=[1.0,0.5]"], "loss.head_weights"),
    (["train.max_steps=0"], "train.max_steps"),
    (["checkpoint.interval=-1"], "checkpoint.interval"),
    (["logging.wandb.mode=sometimes"], "logging.wandb.mode"),
    (["train.micro_batch_size=abc"], "micro_batch_size"),  # type error from the schema
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[o[0][-1] for o in BAD])
def test_invalid_config_fails_fast_naming_the_field(overrides, field):
    # The data path does not exist: the error must come from the config, before any data access.
    t0 = time.perf_counter()
    with pytest.raises((ValueError, HydraException, OmegaConfBaseException)) as info:
        compose_job_config(["data.sources=[{path:/nonexistent/data}]", *overrides])
    assert time.perf_counter() - t0 < 3.0
    assert field in str(info.value)
    assert "nonexistent" not in str(info.value)


def test_global_batch_tokens_accepts_multiples():
    cfg = compose_job_config(["train.micro_batch_size=2", "data.seq_len=32", "train.global_batch_tokens=256"])
    assert cfg.train.global_batch_tokens == 256


def test_cli_rejects_bad_config_before_any_work(tmp_path):
    """`python -m mtp_pretrain.train` with a bad value: non-zero exit, the field's name in the
    output, no run started (no model line, no metrics), in the time of Python + torch imports."""
    run_dir = tmp_path / "run"
    cmd = cli_command(["data.sources=[{path:/nonexistent/data}]", "model.n_future=0"], run_dir)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=_env(), text=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "model.n_future must be >= 1" in out
    assert "[mtp] model" not in out and "nonexistent" not in out.replace("/nonexistent/data}]", "")
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    # Imports (torch, hydra) dominate; on a loaded 2-core machine that is several seconds.
    assert elapsed < 60, f"took {elapsed:.1f}s"
