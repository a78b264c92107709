"""scripts/training_status.py: where a running run stands, and its curve copied."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("training_status", ROOT / "scripts" / "training_status.py")
status = importlib.util.module_from_spec(spec)
spec.loader.exec_module(status)


def _run(tmp_path: Path, lines: list[dict]) -> Path:
    run = tmp_path / "runs" / "lit_a"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_a_row_names_the_last_complete_epoch_and_the_best(tmp_path, capsys) -> None:
    run = _run(
        tmp_path,
        [
            {"epoch": 1, "complete_epoch": True, "val_elbo": -120.0},
            {"epoch": 2, "complete_epoch": True, "val_elbo": -110.5},
            {"epoch": 3, "complete_epoch": True, "val_elbo": -111.0},
            {"epoch": 4, "complete_epoch": False, "val_elbo": -100.0},  # a stop mid-epoch: not counted
        ],
    )
    out_dir = tmp_path / "results" / "training"
    assert status.main([str(run), "--copy-to", str(out_dir)]) == 0
    assert "| `lit_a` | 3 | -110.50 (2) | — | +450.00 / 100 epochs |" in capsys.readouterr().out
    assert (out_dir / "lit_a" / "metrics.jsonl").read_text() == (run / "metrics.jsonl").read_text()


def test_a_run_without_a_complete_epoch_is_one_error_line(tmp_path, capsys) -> None:
    run = _run(tmp_path, [])
    assert status.main([str(run)]) == 2
    assert capsys.readouterr().err.startswith("training_status: error: ")
    assert status.main([str(tmp_path / "none")]) == 2


def test_hours_add_the_complete_epochs_seconds_and_the_slope_is_per_100_epochs(tmp_path, capsys) -> None:
    lines = [
        {"epoch": e, "complete_epoch": True, "val_elbo": -100.0 + 0.02 * e, "seconds": 360.0} for e in range(1, 61)
    ]
    lines += [{"epoch": 61, "complete_epoch": False, "val_elbo": 0.0, "seconds": 9999.0}]
    run = _run(tmp_path, lines)
    assert status.main([str(run)]) == 0
    # 60 epochs of 6 minutes; the last 50 epochs rise 0.02 nats an epoch
    assert "| `lit_a` | 60 | -98.80 (60) | 6.0 | +2.00 / 100 epochs |" in capsys.readouterr().out
