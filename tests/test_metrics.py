"""The one reader of ``metrics.jsonl`` (``mtp_pretrain.metrics.read_metrics``) and the writer's
repair of a record cut short by a killed job."""

from __future__ import annotations

import json

import pytest

from mtp_pretrain.config import WandbConfig
from mtp_pretrain.metrics import MetricsLogger, last_per_step, read_metrics, train_records

TRAIN = [{"step": s, "loss": 5.0 - s, "tokens_seen": 64 * s} for s in (1, 2, 3)]
VAL = {"step": 2, "val/loss": 4.5, "val/loss/head_1": 4.5}


def write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_reads_a_run_directory_or_the_file(tmp_path):
    write(tmp_path / "metrics.jsonl", TRAIN[:2] + [VAL] + TRAIN[2:])
    records = read_metrics(tmp_path)
    assert records == TRAIN[:2] + [VAL] + TRAIN[2:]
    assert read_metrics(tmp_path / "metrics.jsonl") == records


def test_an_unfinished_last_line_is_left_out(tmp_path):
    """A killed job (or one still writing) leaves a last record without its newline."""
    write(tmp_path / "metrics.jsonl", TRAIN, tail='{"step": 4, "loss": 1.2')
    assert read_metrics(tmp_path) == TRAIN


@pytest.mark.parametrize("bad, why", [('{"step": 2, "loss": 1.', "not a JSON record"),
                                      ('[1, 2]', "expected a JSON object with a 'step' key"),
                                      ('{"loss": 3.0}', "expected a JSON object with a 'step' key")])
def test_a_corrupt_line_in_the_middle_names_file_and_line(tmp_path, bad, why):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(TRAIN[0]) + "\n" + bad + "\n" + json.dumps(TRAIN[1]) + "\n")
    with pytest.raises(ValueError, match=f"metrics.jsonl:2: {why}"):
        read_metrics(tmp_path)
    # a corrupt last line that did get its newline is corruption too, not an unfinished record
    path.write_text(json.dumps(TRAIN[0]) + "\n" + bad + "\n")
    with pytest.raises(ValueError, match=f"metrics.jsonl:2: {why}"):
        read_metrics(tmp_path)


def test_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path, missing_ok=True) == []


def test_steps_redone_after_a_resume(tmp_path):
    """A run resumed from step 1 logs steps 2 and 3 again: every attempt, or the last one."""
    redone = [{"step": s, "loss": 9.0 + s, "tokens_seen": 64 * s} for s in (2, 3)]
    write(tmp_path / "metrics.jsonl", TRAIN + [VAL] + redone + [VAL | {"val/loss": 4.0}])
    records = read_metrics(tmp_path)
    attempts = train_records(records)
    assert list(attempts) == [1, 2, 3]
    assert [r["loss"] for r in attempts[2]] == [3.0, 11.0] and [r["loss"] for r in attempts[3]] == [2.0, 12.0]
    assert {s: r["loss"] for s, r in last_per_step(records).items()} == {1: 4.0, 2: 11.0, 3: 12.0}
    assert {s: r["val/loss"] for s, r in last_per_step(records, "val/loss").items()} == {2: 4.0}


def test_the_writer_drops_an_unfinished_record_before_appending(tmp_path, capsys):
    """Resuming after a kill mid-write: the cut record is removed, so that the next record does not
    glue onto it and make a corrupt line in the middle of the file."""
    write(tmp_path / "metrics.jsonl", TRAIN, tail='{"step": 4, "loss": 1.2')
    logger = MetricsLogger(tmp_path, enabled=True, wandb_cfg=WandbConfig(mode="disabled"), config={})
    logger.log({"step": 4, "loss": 1.0})
    logger.close()
    assert "removed an unfinished last record (23 bytes)" in capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in records] == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 1.0)]
    # a complete file is appended to as it is
    logger = MetricsLogger(tmp_path, enabled=True, wandb_cfg=WandbConfig(mode="disabled"), config={})
    logger.log({"step": 5, "loss": 0.5})
    logger.close()
    assert "removed" not in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
