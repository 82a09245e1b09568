"""The benchmarks' launcher (``bench.common.launch``): a fresh process or N ranks under
``torch.distributed.run``, its JSON result, and clear errors on failure and timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.common import LaunchError, launch

# A launched module: reports what its environment says; --fail exits with a message; --hang starts
# a grandchild and sleeps (both must die when the launch times out).
PROBE = '''
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--fail", action="store_true")
ap.add_argument("--hang", help="file for the pids")
ap.add_argument("--result-file")
args = ap.parse_args()
if args.fail:
    sys.exit("probe: the input is bad")
if args.hang:
    child = subprocess.Popen(["sleep", "600"])
    Path(args.hang).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(600)
if os.environ.get("RANK", "0") == "0":
    Path(args.result_file).write_text(json.dumps({k: os.environ.get(k) for k in (
        "RANK", "WORLD_SIZE", "OMP_NUM_THREADS", "MASTER_PORT", "BENCH_PROBE")}))
'''


@pytest.fixture
def probe(tmp_path) -> dict:
    (tmp_path / "bench_probe.py").write_text(PROBE)
    return {"PYTHONPATH": str(tmp_path)}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.distributed
def test_launch_ranks_returns_rank_zero_result(probe, monkeypatch):
    monkeypatch.setenv("RANK", "7")  # a bench started inside an outer job: its ranks form their own group
    monkeypatch.setenv("WORLD_SIZE", "16")
    got = launch("bench_probe", nproc=2, env=probe | {"BENCH_PROBE": "yes"})
    assert got["RANK"] == "0" and got["WORLD_SIZE"] == "2" and got["OMP_NUM_THREADS"] == "1"
    assert got["BENCH_PROBE"] == "yes" and int(got["MASTER_PORT"]) > 0
    one = launch("bench_probe", threads=3, env=probe)  # a plain process: no process group
    assert one["RANK"] is None and one["WORLD_SIZE"] is None and one["OMP_NUM_THREADS"] == "3"


def test_launch_failure_names_the_exit_and_shows_the_output(probe):
    with pytest.raises(LaunchError) as e:
        launch("bench_probe", ["--fail"], env=probe, what="probe run")
    msg = str(e.value)
    assert msg.startswith("probe run: exit code 1") and "bench_probe --fail" in msg
    assert "probe: the input is bad" in msg


def test_launch_timeout_kills_the_whole_process_group(probe, tmp_path):
    pids = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match="not finished after 5 s, killed"):
        launch("bench_probe", ["--hang", str(pids)], env=probe, timeout=5)
    assert time.monotonic() - t0 < 30
    launched, grandchild = map(int, pids.read_text().split())
    deadline = time.monotonic() + 10
    while (alive(launched) or alive(grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(launched) and not alive(grandchild)


# A whole bench, launched by another (bench.gpu_acceptance runs bench.decode_speed so): progress on
# stdout, then its final line, which the launcher gets as the result.
WHOLE_BENCH = '''
import argparse
from bench.common import add_result_file_arg, print_result

ap = argparse.ArgumentParser()
add_result_file_arg(ap)
args = ap.parse_args()
print("progress: 1 of 1")
print_result({"bench": "whole", "figure": 42}, args.result_file)
'''


def test_launch_returns_a_whole_benchs_final_line(tmp_path):
    (tmp_path / "bench_whole.py").write_text(WHOLE_BENCH)
    got = launch("bench_whole", env={"PYTHONPATH": str(tmp_path)})
    assert got == {"bench": "whole", "figure": 42}
