"""mtp-submit without a cluster: rendering of the batch script, override checks, the sweep command
and the Hydra launcher config. Fast; part of `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mtp_pretrain.launch import submit

REPO_ROOT = Path(__file__).resolve().parents[2]


def render_script(tmp_path, *args) -> str:
    run_dir = tmp_path / "run"
    assert submit.main(["--dry-run", "--run-dir", str(run_dir), *args]) == 0
    return (run_dir / "slurm" / "train.sbatch").read_text()


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_render_fills_placeholders_and_drops_empty_sbatch_lines():
    template = "#SBATCH --a={{a}}\n#SBATCH --b={{b}}\n{{extra}}\necho {{a}}\n"
    assert submit.render(template, {"a": "1", "b": "", "extra": ""}) == "#SBATCH --a=1\necho 1\n"
    with pytest.raises(KeyError, match="b"):
        submit.render(template, {"a": "1", "extra": ""})


def test_rendered_script_has_resources_signal_requeue_and_overrides(tmp_path):
    script = render_script(tmp_path, "--nodes", "2", "--ntasks-per-node", "4", "--gpus-per-node", "4",
                           "--cpus-per-task", "8", "--time", "2:00:00", "--partition", "gpu",
                           "--account", "proj", "--sbatch-arg=--mem=64G", "--signal-seconds", "300",
                           "model=tiny", "optim.lr=3e-4", "data.sources=[{path:/d,weight:1.0}]")
    lines = sbatch_lines(script)
    for expected in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8",
                     "--time=2:00:00", "--partition=gpu", "--account=proj", "--mem=64G",
                     "--signal=USR1@300", "--requeue", "--open-mode=append"]:
        assert f"#SBATCH {expected}" in lines
    run_dir = tmp_path / "run"
    assert f"#SBATCH --output={run_dir}/slurm/job-%j.out" in lines
    args_line = next(line for line in script.splitlines() if line.startswith("TRAIN_ARGS="))
    assert args_line == (f"TRAIN_ARGS=(-m mtp_pretrain.train hydra.run.dir={run_dir} checkpoint.dir={run_dir}/checkpoints "
                         "train.resume=auto model=tiny optim.lr=3e-4 'data.sources=[{path:/d,weight:1.0}]')")
    assert "srun --kill-on-bad-exit=1" in script and f"bash {REPO_ROOT}/slurm/run_rank.sh" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)   # valid shell


def test_optional_sbatch_lines_are_left_out_and_user_keys_win(tmp_path):
    script = render_script(tmp_path, "train.resume=never", "hydra.run.dir=/elsewhere")
    lines = " ".join(sbatch_lines(script))
    assert "--gpus-per-node" not in lines and "--partition" not in lines and "--account" not in lines
    args_line = next(line for line in script.splitlines() if line.startswith("TRAIN_ARGS="))
    assert "train.resume=auto" not in args_line and "train.resume=never" in args_line
    assert args_line.count("hydra.run.dir=") == 1


def test_torchrun_launcher_asks_one_task_per_node_with_all_cpus(tmp_path):
    script = render_script(tmp_path, "--launcher", "torchrun", "--ntasks-per-node", "4", "--cpus-per-task", "2")
    lines = sbatch_lines(script)
    assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --cpus-per-task=8" in lines
    assert "PROCS_PER_NODE=4" in script and "LAUNCHER=torchrun" in script


@pytest.mark.parametrize("override", ["model.n_future=1,2,4", "optim.lr=range(1,3)", "x=choice(a,b)"])
def test_sweeps_need_multirun(tmp_path, override):
    with pytest.raises(SystemExit, match="--multirun"):
        render_script(tmp_path, override)


def test_lists_and_quoted_commas_are_not_sweeps(tmp_path):
    render_script(tmp_path, "loss.head_weights=[1.0,0.5]", "logging.wandb.project='a,b'")
    with pytest.raises(SystemExit, match="not a Hydra override"):
        render_script(tmp_path, "model")


def test_paths_with_spaces_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="spaces"):
        submit.main(["--dry-run", "--run-dir", str(tmp_path / "a b")])


def test_submit_prints_the_job_id(tmp_path, capsys):
    fake_sbatch = tmp_path / "sbatch"
    fake_sbatch.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\necho '4242;cluster'\n")
    fake_sbatch.chmod(0o755)
    assert submit.main(["--sbatch", str(fake_sbatch), "--run-dir", str(tmp_path / "run"), "model=tiny"]) == 0
    assert capsys.readouterr().out == "4242\n"
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(tmp_path / "run" / "slurm" / "train.sbatch")]


@pytest.mark.parametrize("limit, minutes", [("30", 30), ("1:30", 2), ("02:00:00", 120), ("1-00:00:00", 1440),
                                            ("1-2", 1560), ("0-1:30", 90)])
def test_time_to_minutes(limit, minutes):
    assert submit.time_to_minutes(limit) == minutes


def test_multirun_command_uses_the_submitit_launcher(tmp_path, capsys):
    args = submit.build_parser().parse_intermixed_args(
        ["--multirun", "--nodes", "2", "--ntasks-per-node", "8", "--gpus-per-node", "8", "--time", "4:00:00",
         "--run-dir", str(tmp_path / "sweep"), "model.n_future=1,2,4"])
    cmd = submit.multirun_command(args)
    assert cmd[1:5] == ["-m", "mtp_pretrain.train", "--multirun", "hydra/launcher=slurm"]
    for expected in ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=8", "hydra.launcher.gpus_per_node=8",
                     "hydra.launcher.timeout_min=240", "hydra.launcher.max_num_timeout=3",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", "train.resume=auto", "model.n_future=1,2,4"]:
        assert expected in cmd
    assert not any(c.startswith("hydra.launcher.partition") for c in cmd)


def test_hydra_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from mtp_pretrain.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.nodes == 2
    assert any("MASTER_ADDR" in line for line in launcher.setup)
    assert any("MASTER_PORT" in line for line in launcher.setup)


def test_a_repeated_preemption_signal_cannot_kill_the_exiting_trainer():
    """`scancel --signal=USR1 <job>` reaches every rank twice (from slurmstepd, and forwarded by
    srun). The first one sets the flag; the repeat must neither change it nor, arriving while
    Python shuts down (which restores the default action of signals it handled), kill the rank:
    a rank killed by USR1 exits 138 instead of 75 and the job is not requeued as preempted."""
    code = ("import os, signal\n"
            "from mtp_pretrain.train import PreemptionFlag\n"
            "flag = PreemptionFlag()\n"
            "os.kill(os.getpid(), signal.SIGUSR1)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "print(flag.signal == signal.SIGUSR1,"
            " [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGUSR1, signal.SIGTERM)])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "True [True, True]", proc.stdout
