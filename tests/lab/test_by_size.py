"""lab/by_size.py (`python -m surgery.by_size`): the surgery against the number of points, its files, its table
and its refusals."""

from __future__ import annotations

import json
import math

import pytest

from lab import by_size
from lab.by_size import by_size_main, default_sizes, format_by_size


def test_default_sizes_are_one_and_three_per_decade_then_the_whole_split() -> None:
    assert default_sizes(1397) == [100, 300, 1000, 1397]
    assert default_sizes(50000) == [100, 300, 1000, 3000, 10000, 30000, 50000]
    assert default_sizes(1000) == [100, 300, 1000]  # n itself once
    assert default_sizes(40) == [40]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_each_size_is_written_and_the_whole_split_agrees_with_surgery_json(compose, short_run, tmp_path):
    run_dir, _ = short_run
    cfg = compose(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"output_dir={tmp_path}", config="by_size")
    content, files = by_size_main(cfg)
    rows = content["rows"]
    assert [r["m"] for r in rows] == [100, 300, 1000, 1397]  # the default sizes, then the whole split
    for r in rows:
        assert r["log_m"] == pytest.approx(math.log(r["m"]), abs=1e-12)
        assert r["mutual_info"] <= r["log_m"] + 1e-6
        assert r["marginal_kl"] + r["mutual_info"] == pytest.approx(r["avg_kl_mc"], abs=1e-9)
    saved = json.loads((run_dir / "surgery.json").read_text())  # all 1,397 points, other samples
    for name in ("mutual_info", "marginal_kl"):
        difference = rows[-1][name] - saved[name]
        assert abs(difference) <= 5 * math.hypot(rows[-1][f"{name}_stderr"], saved[f"{name}_stderr"]), name
    assert (content["split"], content["n_points"], content["prior"], content["latent_dim"]) == (
        "train",
        1397,
        "GaussianPrior",
        2,
    )
    assert json.loads(files["json"].read_text()) == json.loads(json.dumps(content))
    assert files["json"] == tmp_path / "by_size.json" and files["plot"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_another_split_gets_its_own_file_names(compose, short_run, tmp_path):
    run_dir, _ = short_run
    cfg = compose(
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
        f"output_dir={tmp_path}",
        "split=test",
        "sizes=[10,200]",
        "plots=false",
        config="by_size",
    )
    content, files = by_size_main(cfg)
    assert [r["m"] for r in content["rows"]] == [10, 200] and content["n_points"] == 200
    assert files == {"json": tmp_path / "by_size_test.json"} and sorted(p.name for p in tmp_path.iterdir()) == [
        "by_size_test.json"
    ]


def test_the_table_has_one_line_per_size_and_names_the_third_term() -> None:
    row = {
        "m": 1000,
        "log_m": math.log(1000),
        "mutual_info": 6.5,
        "marginal_kl": 18.25,
        "total_correlation": 14.0,
        "prior_mismatch_remainder": 4.25,
        "avg_kl_mc": 24.75,
    }
    content = {"split": "train", "n_points": 50000, "prior": "MixturePrior", "latent_dim": 40, "rows": [row]}
    lines = format_by_size({**content, "prior_factorized": False}).splitlines()
    assert lines[0] == (
        "surgery against size on the train split (first M of 50,000 points, prior MixturePrior, 40-D; nats per point)"
    )
    assert lines[1].split() == ["M", "log", "M", "MI", "marginal", "KL", "total", "corr.", "remainder", "avg", "KL"]
    assert lines[2].split() == ["1,000", "6.908", "6.500", "18.250", "14.000", "4.250", "24.750"]
    assert "dim-wise KL" in format_by_size({**content, "prior_factorized": True}).splitlines()[1]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("sizes=[100,50]", "strictly increasing"),
        ("sizes=[2000]", "1..1397"),
        ("sizes=[1.5]", "integers"),
        ("sizes=[]", "a list of integers"),
        ("split=validation", "split must be one of"),
        ("batch_size=0", "batch_size must be a positive integer"),
    ],
)
def test_bad_options_are_refused(compose, short_run, tmp_path, option, message):
    run_dir, _ = short_run
    cfg = compose(
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"output_dir={tmp_path}", option, config="by_size"
    )
    with pytest.raises(ValueError, match=message):  # ConfigError is one
        by_size_main(cfg)
    assert list(tmp_path.iterdir()) == []


def test_the_command_prints_the_table_and_the_files(compose, short_run, tmp_path, capsys, monkeypatch):
    run_dir, _ = short_run
    cfg = compose(
        f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}",
        f"output_dir={tmp_path}",
        "sizes=[50]",
        "plots=false",
        config="by_size",
    )
    by_size.main.__wrapped__(cfg)  # hydra.main's function, without Hydra's own command-line parsing
    out = capsys.readouterr().out
    assert out.startswith("surgery against size on the train split") and f"wrote {tmp_path / 'by_size.json'}" in out
