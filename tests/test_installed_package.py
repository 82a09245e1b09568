"""The package works installed, away from this checkout: a wheel built from the source carries the
shipped configs (``mtp_pretrain/conf/``), and from another directory, with only the unpacked
wheel and the dependencies on the path, the named sizes are listed, ``python -m
mtp_pretrain.train model=tiny`` trains, and a user's own config directory extends the shipped
ones. No network: the wheel is built without build isolation and without an index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, read_metrics, tiny_overrides

SOURCES = ("pyproject.toml", "README.md", "mtp_pretrain", "data_tools")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout unpacked into a fresh folder (what ``pip install`` puts in
    site-packages for a pure-Python wheel): that folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a copy, so that building leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(root / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=300)
    wheels = list((root / "dist").glob("mtp_pretrain-*.whl"))
    assert len(wheels) == 1, wheels
    target = root / "site"
    with zipfile.ZipFile(wheels[0]) as whl:
        shipped = {n for n in whl.namelist() if n.startswith("mtp_pretrain/conf/")}
        whl.extractall(target)
    in_checkout = {str(p.relative_to(REPO)) for p in (REPO / "mtp_pretrain" / "conf").rglob("*.yaml")}
    assert "mtp_pretrain/conf/config.yaml" in in_checkout and "mtp_pretrain/conf/model/tiny.yaml" in in_checkout
    assert shipped == in_checkout
    return target


def run_installed(installed: Path, cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    """``python -S ARGS`` in ``cwd``: no site processing, so neither this checkout's editable
    install nor any other .pth entry is on the path, only the unpacked wheel and the
    dependencies' site-packages."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]]),
               OMP_NUM_THREADS="1", WANDB_SILENT="true", PYTHONNOUSERSITE="1")
    for key in ("RANK", "WORLD_SIZE", "MTP_RUN_ID"):
        env.pop(key, None)
    p = subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    return p


def test_named_sizes_and_training_from_an_installed_wheel(installed, tiny_dataset, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_installed(installed, elsewhere, ["-c", (
        "import json, mtp_pretrain, mtp_pretrain.config as c; from mtp_pretrain.model import MODEL_SIZES; "
        "print(json.dumps({'package': mtp_pretrain.__file__, 'conf': str(c.CONF_DIR), 'sizes': sorted(MODEL_SIZES)}))")])
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(seen["package"]).is_relative_to(installed) and Path(seen["conf"]).is_relative_to(installed)
    sizes = sorted(p.stem for p in (REPO / "mtp_pretrain" / "conf" / "model").glob("*.yaml"))
    assert seen["sizes"] == sizes and {"tiny", "small"} <= set(sizes)

    run_dir = tmp_path / "run"
    run_installed(installed, elsewhere, ["-m", "mtp_pretrain.train", *tiny_overrides(tiny_dataset), "model=tiny",
                                         "train.max_steps=2", "checkpoint.interval=0", "logging.val_interval=0",
                                         "logging.decode_prompts=0", f"hydra.run.dir={run_dir}"])
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    # Hydra records where it read the configs: the installed copy's conf/, not this checkout's
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    main_source = [s for s in hydra_cfg["runtime"]["config_sources"] if s["provider"] == "main"]
    assert len(main_source) == 1 and Path(main_source[0]["path"]).is_relative_to(installed / "mtp_pretrain" / "conf")


def test_own_config_dir_extends_the_shipped_configs(installed, tmp_path):
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "mine.yaml").write_text("name: mine\ndim: 96\nn_layers: 3\nn_heads: 4\n")
    out = run_installed(installed, tmp_path, ["-m", "mtp_pretrain.train", "--config-dir", "my_conf", "model=mine",
                                              "optim=wsd", "--cfg", "job"])
    job = yaml.safe_load(out.stdout[out.stdout.index("model:"):])
    assert job["model"]["name"] == "mine" and job["model"]["dim"] == 96 and job["model"]["n_layers"] == 3
    assert job["optim"]["schedule"] == "wsd"  # a shipped option beside the user's
