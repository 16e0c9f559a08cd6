"""metrics.jsonl: reading a file a run is still writing, and truncating it on resume."""

import json

from alphadecay.metrics import MetricsLogger, read_metrics


def write(path, lines):
    path.write_text("".join(lines))


def test_resume_drops_later_events_and_a_half_written_last_line(tmp_path):
    events = [{"step": s, "loss": 10.0 - s} for s in range(1, 6)]
    write(tmp_path / "metrics.jsonl", [json.dumps(e) + "\n" for e in events] + ['{"step": 6, "lo'])
    assert [e["step"] for e in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # the partial line is skipped
    logger = MetricsLogger(str(tmp_path), enabled=True, project="p", name="n", mode="disabled", config={},
                           resume_step=3)
    assert read_metrics(tmp_path) == events[:3]
    logger.log({"loss": 6.5}, step=4)
    assert read_metrics(tmp_path)[-1] == {"step": 4, "loss": 6.5}
    assert (tmp_path / "metrics.jsonl").read_text().endswith("\n")


def test_a_fresh_run_starts_a_fresh_file(tmp_path):
    write(tmp_path / "metrics.jsonl", ['{"step": 1, "loss": 3.0}\n'])
    MetricsLogger(str(tmp_path), enabled=True, project="p", name="n", mode="disabled", config={}, resume_step=0)
    assert read_metrics(tmp_path) == []
