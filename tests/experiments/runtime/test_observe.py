"""metrics.jsonl across kills and restarts, and results.json written and read back (experiments.runtime.observe)."""

import json
import logging

from experiments.runtime import observe


def _lines(*steps):
    return "".join(json.dumps({"step": s, "split": "train", "loss": s / 10}) + "\n" for s in steps)


def test_resume_drops_a_torn_last_line_and_later_steps_with_a_warning(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(_lines(1, 2, 3) + '{"step": 4, "spl')  # a kill mid-write
    with caplog.at_level(logging.WARNING):
        writer = observe.MetricWriter(str(tmp_path), resume_step=2)
    writer.write(3, "train", {"loss": 0.5})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_text() == _lines(1, 2) + json.dumps(
        {"step": 3, "split": "train", "loss": 0.5}) + "\n"
    assert f"{tmp_path / 'metrics.jsonl'}:4: dropping an unreadable record" in caplog.text


def test_resume_keeps_readable_records_around_a_garbled_middle_line(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_bytes(_lines(1).encode() + b"\xff\xfe garbage\n" + _lines(2, 9).encode())
    with caplog.at_level(logging.WARNING):
        observe.MetricWriter(str(tmp_path), resume_step=5).close()
    assert (tmp_path / "metrics.jsonl").read_text() == _lines(1, 2)
    assert "metrics.jsonl:2: dropping an unreadable record" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_fresh_start_sets_an_old_log_aside(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text(_lines(1, 2))
    with caplog.at_level(logging.WARNING):
        observe.MetricWriter(str(tmp_path)).close()
        (tmp_path / "metrics.jsonl").write_text(_lines(7))
        observe.MetricWriter(str(tmp_path)).close()  # twice within one second: no name clash
    aside = sorted(p for p in tmp_path.iterdir() if p.name.startswith("metrics.jsonl.old-"))
    assert sorted(p.read_text() for p in aside) == sorted([_lines(1, 2), _lines(7)])
    assert not (tmp_path / "metrics.jsonl").exists()
    assert caplog.text.count("which already holds a metrics log: moved it to") == 2


def test_results_round_trip_and_an_unreadable_file_counts_as_not_finished(tmp_path, caplog):
    assert observe.read_results(str(tmp_path)) is None
    fp = {"seed": 0, "optimizer.learning_rate": 0.001}
    observe.write_results(str(tmp_path), final={"accuracy": 0.5}, best={"accuracy": 0.75}, steps=3,
                          wall_time_s=1.5, extra={"fingerprint": fp})
    assert observe.read_results(str(tmp_path)) == {"final": {"accuracy": 0.5}, "best": {"accuracy": 0.75},
                                                    "steps": 3, "wall_time_s": 1.5, "fingerprint": fp}
    text = (tmp_path / "results.json").read_text()
    (tmp_path / "results.json").write_text(text[:len(text) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        assert observe.read_results(str(tmp_path)) is None
    assert f"{tmp_path / 'results.json'} is unreadable" in caplog.text
