"""`python -m surgery.report` on fake run dirs: values over seeds, paired differences, the headline,
incomplete runs, plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import yaml

from lab import report as rep
from surgery.text import TERMS
from vae.validation import ConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_surgery(seed: int, latent_dim: int, prior: str) -> dict:
    """Distinct, exactly checkable numbers per run; a non-factorized prior has a remainder and no dimwise_kl."""
    base = {"gaussian": 0.0, "vampprior": 3.0, "flow": 5.0}[prior] + latent_dim
    mi, mkl = 5.0 + 0.1 * seed + base / 10, 2.0 + 0.3 * seed + base / 5
    out = {
        "split": "train",
        "n_points": 1397,
        "n_samples": 1,
        "log_n": 7.2422,
        "reconstruction": -80.0 - seed,
        "avg_kl": mi + mkl,
        "mutual_info": mi,
        "marginal_kl": mkl,
        "total_correlation": 0.5 + 0.05 * seed,
        "prior_mismatch_remainder": -1.0 - 0.05 * seed if prior == "vampprior" else mkl - 0.5 - 0.05 * seed,
        "prior_factorized": prior != "vampprior",
        "log_likelihood": -85.0 + 0.2 * seed - base / 100,
        "is_samples": 10,
    }
    out["elbo"] = out["reconstruction"] - out["avg_kl"]
    out["optimal_prior_elbo"] = out["elbo"] + mkl
    out["identity_gap"] = 0.0
    out.update({f"{t.name}_stderr": 0.01 for t in TERMS})
    factorized = out["prior_factorized"]
    out["dimwise_kl"] = out["prior_mismatch_remainder"] if factorized else None
    out["dimwise_kl_stderr"] = out["prior_mismatch_remainder_stderr"] if factorized else None
    return out


def old_format(values: dict) -> dict:
    """surgery.json as written before the remainder had its own key: `dimwise_kl` held it for every prior."""
    out = {k: v for k, v in values.items() if not k.startswith("prior_mismatch_remainder")}
    out["dimwise_kl"] = values["prior_mismatch_remainder"]
    out["dimwise_kl_stderr"] = values["prior_mismatch_remainder_stderr"]
    return out


def make_run(
    path: Path,
    prior: str,
    latent_dim: int,
    seed: int,
    *,
    surgery: bool = True,
    checkpoints: bool = True,
    epochs: int = 7,
    density: bool = False,
    samples: bool = False,
    old: bool = False,
    data: dict | None = None,
    hydra_yaml: bool = True,
    log_px: Sequence[float] | None = None,
    is_samples: int = 10,
) -> dict | None:
    """A run dir as train.py leaves it; `log_px`: its per-point test log p(x) (surgery.json's
    log_likelihood is then their mean); `hydra_yaml=False`: as committed before hydra.yaml was kept."""
    (path / ".hydra").mkdir(parents=True)
    target = {
        "gaussian": "priors.gaussian.GaussianPrior",
        "vampprior": "priors.vampprior.VampPrior",
        "flow": "priors.flow.FlowPrior",
    }[prior]
    config = {"seed": seed, "vae": {"latent_dim": latent_dim}, "prior": {"_target_": target}}
    if data is not None:
        config["data"] = data
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if hydra_yaml:
        choices = {"hydra": {"runtime": {"choices": {"prior": prior}}}}
        (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    # a resumed run repeats its last epoch line; an incomplete last epoch is not counted
    lines = [{"epoch": e, "complete_epoch": True} for e in range(1, epochs + 1)]
    lines += [{"epoch": epochs, "complete_epoch": True}, {"epoch": epochs + 1, "complete_epoch": False}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if checkpoints:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "last.pt").write_bytes(b"x")
    for wanted, name in ((density, "surgery_aggregate_posterior.png"), (samples, "samples.png")):
        if wanted:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(2, 2))
            fig.add_subplot().plot([0, 1], [1, 0])
            fig.savefig(path / name)
    if surgery:
        values = fake_surgery(seed, latent_dim, prior)
        values["is_samples"] = is_samples
        if log_px is not None:
            np.save(path / "log_px_test.npy", np.asarray(log_px, dtype=np.float64))
            values["log_likelihood"] = float(np.mean(log_px))
        (path / "surgery.json").write_text(json.dumps(old_format(values) if old else values))
        return values
    return None


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict]:
    """A multirun dir: 2 priors x 2 latent sizes x 3 seeds, plus three broken jobs."""
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    values: dict[tuple[str, int], list[dict]] = {}
    job = 0
    for prior in ("vampprior", "gaussian"):  # the report orders gaussian first anyway
        for latent_dim in (2, 10):
            for seed in (0, 1, 2):
                v = make_run(
                    root / str(job), prior, latent_dim, seed, epochs=5 + seed, density=latent_dim == 2 and seed == 0
                )
                values.setdefault((prior, latent_dim), []).append(v)
                job += 1
    make_run(root / str(job), "gaussian", 40, 0, surgery=False)  # trained, surgery missing
    make_run(root / str(job + 1), "gaussian", 40, 1, surgery=False, checkpoints=False, epochs=0)  # failed early
    (root / str(job + 2)).mkdir()  # never started
    return root, values


def test_rows_hold_mean_and_std_over_seeds(sweep) -> None:
    root, values = sweep
    report = rep.build_report([root])
    assert [(r.prior, r.latent_dim) for r in report.rows] == [
        ("gaussian", 2),
        ("gaussian", 10),
        ("vampprior", 2),
        ("vampprior", 10),
    ]
    for row in report.rows:
        runs = values[(row.prior, row.latent_dim)]
        assert row.n_runs == 3 and row.seeds == (0, 1, 2) and row.epochs == (5, 6, 7)
        for key, _ in rep.COLUMNS:
            xs = [v[key] for v in runs if v[key] is not None]  # None: not reported (a non-factorized dimwise_kl)
            if not xs:
                assert row.stats[key].mean is None and rep.format_stat(row.stats[key]) == "—"
                continue
            assert row.stats[key].mean == pytest.approx(statistics.mean(xs), abs=1e-12)
            assert row.stats[key].std == pytest.approx(statistics.stdev(xs), abs=1e-12)
            assert row.stats[key].std > 0  # the seeds differ, so a wrong grouping would show


def test_markdown_table_cells_are_the_formatted_values(sweep) -> None:
    root, values = sweep
    md = rep.render_markdown(rep.build_report([root]))
    main_table = md.split("## Per seed")[0]
    table = [line for line in main_table.splitlines() if line.startswith(("| gaussian", "| vampprior"))]
    assert len(table) == 4
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        prior, latent_dim = cells[0], int(cells[1])
        runs = values[(prior, latent_dim)]
        assert cells[2] == "—"  # no variant: the runs differ only in prior, size and seed
        for (key, _), cell in zip(rep.COLUMNS, cells[3:], strict=False):
            xs = [v[key] for v in runs if v[key] is not None]  # None: not reported (a non-factorized dimwise_kl)
            expected = f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if xs else "—"
            assert cell == expected, (prior, latent_dim, key)
        assert cells[-4:] == ["3", "0, 1, 2", "5–7", "train"]  # runs, seeds, epochs, split
    # and every seed's own values, in the per-seed table
    per_seed = md.split("## Per seed")[1].split("##")[0]
    for (prior, latent_dim), runs in values.items():
        for seed, v in enumerate(runs):
            cells = " | ".join("—" if v[k] is None else f"{v[k]:.2f}" for k, _ in rep.COLUMNS)
            assert f"| {prior} | {latent_dim} | — | {seed} | {5 + seed} | {cells} | 0.01 |" in per_seed


def test_old_surgery_json_is_read_in_the_current_format(tmp_path: Path) -> None:
    """A file from before `prior_mismatch_remainder` existed: a non-factorized prior's `dimwise_kl` is read
    as its remainder (no dimension-wise KL); a factorized prior's is both."""
    values = {}
    for prior in ("gaussian", "vampprior"):
        values[prior] = make_run(tmp_path / "old" / prior, prior, 10, 0, old=True)
        make_run(tmp_path / "new" / prior, prior, 10, 0)
    for prior, v in values.items():
        read = rep.read_run(tmp_path / "old" / prior).surgery
        assert read == v, prior  # exactly what the current format holds
        assert read == rep.read_run(tmp_path / "new" / prior).surgery
    assert values["vampprior"]["dimwise_kl"] is None and values["vampprior"]["prior_mismatch_remainder"] == -1.0
    assert rep.render_markdown(rep.build_report([tmp_path / "old"])).split("## Runs")[0] == rep.render_markdown(
        rep.build_report([tmp_path / "new"])
    ).split("## Runs")[0].replace(str(tmp_path / "new"), str(tmp_path / "old"))


def test_incomplete_runs_are_listed_with_their_reason(sweep) -> None:
    root, _ = sweep
    report = rep.build_report([root])
    reasons = {r.path.name: r.problem for r in report.incomplete}
    assert set(reasons) == {"12", "13", "14"}
    assert "no surgery.json" in reasons["12"] and "checkpoints" not in reasons["12"]
    assert "no checkpoints" in reasons["13"]
    assert "no .hydra/config.yaml" in reasons["14"] and "no checkpoints" in reasons["14"]
    md = rep.render_markdown(report)
    section = md.split("## Incomplete runs")[1].split("##")[0]
    for name, reason in reasons.items():
        assert any(line.startswith(f"| {root / name} |") and reason in line for line in section.splitlines())
    assert "Complete runs: 12; incomplete: 3." in md


@pytest.mark.slow
def test_cli_writes_table_and_pngs(sweep, tmp_path: Path, capsys) -> None:
    root, _ = sweep
    out = tmp_path / "report"
    assert rep.main([str(root / "0"), str(root), "--out", str(out)]) == 0  # a run given twice counts once
    printed = capsys.readouterr().out
    assert "15 runs: 12 complete, 3 incomplete" in printed and f"table: {out / 'report.md'}" in printed
    for name in ("decomposition.png", "marginal_kl.png", "density_grids.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"plot:  {out / name}" in printed
    assert "![density_grids](density_grids.png)" in (out / "report.md").read_text()


def test_no_density_pictures_no_grid(tmp_path: Path) -> None:
    make_run(tmp_path / "run", "gaussian", 10, 0)
    files = rep.write_report(rep.build_report([tmp_path / "run"]), tmp_path / "out")
    assert [p.name for p in files.plots] == ["decomposition.png", "marginal_kl.png"]


def test_missing_path_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert rep.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_no_run_found_exits_non_zero(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert rep.main([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no run dirs found" in capsys.readouterr().err


def test_two_runs_of_one_seed_in_a_row_are_refused_by_name(tmp_path: Path, capsys) -> None:
    """A row's mean and sd are over seeds: a seed's second run (a copy evaluated at another epoch,
    a run of older code with the same config) must not count as another seed."""
    make_run(tmp_path / "runs" / "a", "gaussian", 10, 0)
    make_run(tmp_path / "runs" / "b", "gaussian", 10, 1)
    make_run(tmp_path / "evaluated" / "a-epoch5", "gaussian", 10, 0)
    make_run(tmp_path / "runs" / "other", "gaussian", 20, 0)  # another latent size: another row
    assert [r.seeds for r in rep.build_report([tmp_path / "runs"]).rows] == [(0, 1), (0,)]
    with pytest.raises(ConfigError) as e:
        rep.build_report([tmp_path])
    message = str(e.value)
    assert f"gaussian, z=10, seed 0: {tmp_path / 'evaluated' / 'a-epoch5'}, {tmp_path / 'runs' / 'a'}." in message
    assert "z=20" not in message and "seed 1" not in message
    assert rep.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("surgery.report: error: a row's runs are its seeds") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_each_run_shows_its_code_and_a_row_made_by_different_code_is_named(tmp_path: Path) -> None:
    from lab.run_dir import code_version, record_code

    sources = {}
    for name, text in (("a", "y = 1\n"), ("b", "y = 2\n")):
        (tmp_path / name / "priors").mkdir(parents=True)
        (tmp_path / name / "priors" / "p.py").write_text(text)
        sources[name] = tmp_path / name
    runs = tmp_path / "runs"
    made_by = {  # (prior, seed): the code of each process that trained it, oldest first
        ("gaussian", 0): "a",
        ("gaussian", 1): "a",
        ("vampprior", 0): "a",
        ("vampprior", 1): "ab",  # resumed with other code
        ("flow", 0): "",  # made before code.jsonl was kept
        ("flow", 1): "b",
    }
    for (prior, seed), code in made_by.items():
        make_run(runs / f"{prior}{seed}", prior, 2, seed)
        for step, name in enumerate(code):
            record_code(runs / f"{prior}{seed}", 100 * step, root=sources[name])
    make_run(runs / "gaussian2", "gaussian", 2, 2)
    (runs / "gaussian2" / "code.jsonl").write_text("not json\n")

    report = rep.build_report([runs])
    assert not report.incomplete  # an unreadable code.jsonl leaves the run complete
    by_prior = {row.prior: row for row in report.rows}
    assert [rep.made_by_different_code(by_prior[p]) for p in ("gaussian", "vampprior", "flow")] == [False, True, False]
    digest = {name: code_version(root)["sources_sha256"] for name, root in sources.items()}
    label = {name: f"no checkout (sources {d[:8]})" for name, d in digest.items()}
    table = rep.render_markdown(report)
    for (prior, seed), code in made_by.items():
        shown = " → ".join(label[n] for n in code) or "—"
        assert f"| {shown} | {runs / f'{prior}{seed}'} |" in table
    assert f"| code.jsonl unreadable | {runs / 'gaussian2'} |" in table
    assert "Made by different code" in table and "vampprior, z=2." in table


def test_runs_differing_in_any_setting_are_separate_rows(tmp_path: Path) -> None:
    for seed, lr in ((0, 1e-3), (1, 1e-3), (0, 5e-4)):
        path = tmp_path / f"lr{lr}-s{seed}"
        make_run(path, "gaussian", 10, seed)
        config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text())
        config["trainer"] = {"optimizer": {"lr": lr}, "progress": seed == 0}  # progress: bookkeeping, ignored
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    report = rep.build_report([tmp_path])
    assert sorted((r.variant, r.n_runs) for r in report.rows) == [
        ("trainer.optimizer.lr=0.0005", 1),
        ("trainer.optimizer.lr=0.001", 2),
    ]
    assert "trainer.optimizer.lr=0.0005" in rep.render_markdown(report)


def test_paired_differences_match_a_hand_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hardness = rng.normal(-90, 20, size=500)  # shared by both models: cancels in the pairing
    a = hardness + 2.0 + rng.normal(0, 0.5, size=500)
    b = hardness + rng.normal(0, 0.5, size=500)
    make_run(tmp_path / "a", "vampprior", 40, 0, log_px=a)
    make_run(tmp_path / "b", "gaussian", 40, 0, log_px=b)
    report = rep.build_report([tmp_path])
    (pair,) = report.paired
    d = a - b  # the later row (vampprior) minus the baseline (gaussian, first in PRIOR_ORDER)
    assert (pair.row, pair.baseline, pair.same_setting, pair.setting) == ("vampprior", "gaussian", True, "z=40")
    (seed,) = pair.seeds
    assert (seed.seed, seed.n_points) == (0, 500)
    assert seed.mean == pytest.approx(d.mean(), abs=1e-12)
    assert seed.stderr == pytest.approx(d.std(ddof=1) / np.sqrt(500), rel=1e-9)
    assert seed.stderr < 0.1 < 20 / np.sqrt(500)  # far below the unpaired spread
    assert pair.over_seeds == rep.Stat(seed.mean, None, 1) and pair.unpaired == ()
    md = rep.render_markdown(report)
    assert (
        f"| vampprior − gaussian | 1 | seed 0: {d.mean():+.3f} ± {seed.stderr:.3f} | {d.mean():+.3f} (one seed) "
        "| 500 | — |" in md
    )


#: Per-point test log p(x) of three priors, seeds 0-2 (the flow has no seed 2), on 4 test points,
#: made so the differences are round: vampprior - gaussian is [1, 2, 3, 2], [2.5, 2.5, 1.5, 3.5] and
#: [-0.5, 3.5, 1.5, 1.5] at seeds 0, 1, 2; flow - gaussian is [3, 4, 3, 2] and [4, 4, 4, 4] at seeds 0, 1.
GAUSSIAN = {s: [-80.0 + 0.1 * s, -90.0 + 0.1 * s, -100.0 + 0.1 * s, -110.0 + 0.1 * s] for s in (0, 1, 2)}
VAMP_MINUS_GAUSSIAN = {0: [1.0, 2.0, 3.0, 2.0], 1: [2.5, 2.5, 1.5, 3.5], 2: [-0.5, 3.5, 1.5, 1.5]}
FLOW_MINUS_GAUSSIAN = {0: [3.0, 4.0, 3.0, 2.0], 1: [4.0, 4.0, 4.0, 4.0]}


@pytest.fixture
def three_priors(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for s, g in GAUSSIAN.items():
        make_run(root / f"gaussian_s{s}", "gaussian", 40, s, log_px=g)
        vamp = [x + y for x, y in zip(g, VAMP_MINUS_GAUSSIAN[s], strict=True)]
        make_run(root / f"vampprior_s{s}", "vampprior", 40, s, log_px=vamp)
        if s in FLOW_MINUS_GAUSSIAN:
            flow = [x + y for x, y in zip(g, FLOW_MINUS_GAUSSIAN[s], strict=True)]
            make_run(root / f"flow_s{s}", "flow", 40, s, log_px=flow)
    return root


def test_seed_statistics_and_paired_differences_by_hand(three_priors: Path) -> None:
    """Every number below is worked out by hand from the tables above."""
    report = rep.build_report([three_priors])
    rows = {r.prior: r for r in report.rows}
    assert [r.prior for r in report.rows] == ["gaussian", "vampprior", "flow"]
    assert (rows["gaussian"].seeds, rows["vampprior"].seeds, rows["flow"].seeds) == ((0, 1, 2), (0, 1, 2), (0, 1))
    # test log p(x) per seed: gaussian -95, -94.9, -94.8; vampprior -93, -92.4, -93.3; flow -92, -90.9
    expected = {"gaussian": (-94.9, 0.1), "vampprior": (-92.9, math.sqrt(0.21)), "flow": (-91.45, 0.55 * math.sqrt(2))}
    for prior, (mean, sd) in expected.items():
        s = rows[prior].stats["log_likelihood"]
        assert (s.mean, s.std, s.n) == (
            pytest.approx(mean, abs=1e-9),
            pytest.approx(sd, abs=1e-9),
            len(rows[prior].seeds),
        )

    pairs = {(p.row, p.baseline): p for p in report.paired}
    assert list(pairs) == [("vampprior", "gaussian"), ("flow", "gaussian"), ("flow", "vampprior")]
    assert all(p.same_setting and p.setting == "z=40" for p in pairs.values())
    se_a, se_b, se_c = math.sqrt(1 / 6), math.sqrt(2 / 3), math.sqrt(1 / 3)  # sd / 2 over 4 points
    by_hand = {
        # (seed, mean, stderr) per paired seed; (mean, sd) over seeds; the unpaired seeds
        ("vampprior", "gaussian"): ([(0, 2.0, se_a), (1, 2.5, se_a), (2, 1.5, se_b)], (2.0, 0.5), ()),
        ("flow", "gaussian"): ([(0, 3.0, se_a), (1, 4.0, 0.0)], (3.5, math.sqrt(0.5)), ("seed 2: only gaussian",)),
        ("flow", "vampprior"): (
            [(0, 1.0, se_c), (1, 1.5, se_a)],
            (1.25, math.sqrt(0.125)),
            ("seed 2: only vampprior",),
        ),
    }
    for key, (seeds, (mean, sd), unpaired) in by_hand.items():
        pair = pairs[key]
        assert [(s.seed, s.n_points) for s in pair.seeds] == [(seed, 4) for seed, _, _ in seeds], key
        for s, (_, m, se) in zip(pair.seeds, seeds, strict=True):
            assert (s.mean, s.stderr) == (pytest.approx(m, abs=1e-9), pytest.approx(se, abs=1e-9)), key
        assert pair.over_seeds.mean == pytest.approx(mean, abs=1e-9) and pair.over_seeds.n == len(seeds)
        assert pair.over_seeds.std == pytest.approx(sd, abs=1e-9)
        assert pair.unpaired == unpaired
    md = rep.render_markdown(report)
    assert "### Priors in one setting" in md and "**z=40**" in md and "### Other pairs" not in md
    assert (
        "| flow − gaussian | 2 | seed 0: +3.000 ± 0.408; seed 1: +4.000 ± 0.000 | +3.500 ± 0.707 | 4 "
        "| seed 2: only gaussian |" in md
    )
    assert "| vampprior | 40 | — | -92.90 ± 0.46 |" not in md  # log p(x) is the last estimate column
    assert " | -92.90 ± 0.46 | 3 | 0, 1, 2 | 7 | train |" in md


def test_a_seed_without_per_point_values_is_left_out_of_the_pair_and_named(three_priors: Path) -> None:
    (three_priors / "vampprior_s1" / "log_px_test.npy").unlink()
    np.save(three_priors / "flow_s0" / "log_px_test.npy", np.zeros(3))  # scored on other points
    report = rep.build_report([three_priors])
    pairs = {(p.row, p.baseline): p for p in report.paired}
    vamp = pairs[("vampprior", "gaussian")]
    assert [s.seed for s in vamp.seeds] == [0, 2]
    assert vamp.unpaired == ("seed 1: no per-point log p(x) (log_px_test.npy)",)
    assert vamp.over_seeds.mean == pytest.approx(1.75) and vamp.over_seeds.std == pytest.approx(math.sqrt(0.125))
    flow = pairs[("flow", "gaussian")]
    assert [s.seed for s in flow.seeds] == [1]
    assert flow.unpaired == ("seed 0: other test points (3 and 4)", "seed 2: only gaussian")
    # the rows' own statistics still count every seed (from surgery.json)
    assert {r.prior: r.stats["log_likelihood"].n for r in report.rows} == {"gaussian": 3, "vampprior": 3, "flow": 2}


def test_pairs_across_settings_are_listed_apart(tmp_path: Path) -> None:
    make_run(tmp_path / "g40", "gaussian", 40, 0, log_px=[-90.0, -80.0])
    make_run(tmp_path / "v40", "vampprior", 40, 0, log_px=[-89.0, -78.0])
    make_run(tmp_path / "g10", "gaussian", 10, 0, log_px=[-95.0, -84.0])
    report = rep.build_report([tmp_path])
    same = [(p.row, p.baseline) for p in report.paired if p.same_setting]
    other = [(p.row, p.baseline, p.seeds[0].mean) for p in report.paired if not p.same_setting]
    assert same == [("vampprior", "gaussian")]
    assert other == [("gaussian, z=40", "gaussian, z=10", 4.5), ("vampprior, z=40", "gaussian, z=10", 6.0)]
    md = rep.render_markdown(report)
    assert "| gaussian, z=40 − gaussian, z=10 | 1 | seed 0: +4.500 ± 0.500 | +4.500 (one seed) | 2 | — |" in md


def test_runs_with_and_without_hydra_yaml_are_seeds_of_one_row(tmp_path: Path) -> None:
    """Seed 0 committed without .hydra/hydra.yaml is named by its class's option, like the seeds with it."""
    make_run(tmp_path / "s0", "flow", 40, 0, hydra_yaml=False)
    make_run(tmp_path / "s1", "flow", 40, 1)
    make_run(tmp_path / "k", "gaussian", 40, 2, is_samples=5000)  # evaluated otherwise: its own row
    make_run(tmp_path / "k2", "gaussian", 40, 3)
    report = rep.build_report([tmp_path])
    assert [(r.prior, r.seeds, r.variant) for r in report.rows] == [
        ("gaussian", (3,), "evaluation.is_samples=10"),
        ("gaussian", (2,), "evaluation.is_samples=5000"),
        ("flow", (0, 1), "evaluation.is_samples=10"),
    ]
    assert rep.prior_name("priors.flow.FlowPrior", None) == "flow"
    assert rep.prior_name("priors.flow.FlowPrior", "flow_spline") == "flow_spline"
    assert rep.prior_name("mypkg.MyPrior", None) == "MyPrior"


HEADLINE_SPEC = """
where: {vae.latent_dim: 40, data.byte_divisor: 255}
priors:
  gaussian: {name: Gaussian, published: [-84.45, 0.12]}
  vampprior: {name: "VampPrior, K = 500", published: [-82.43, 0.06]}
source: "Published: a table."
"""


@pytest.mark.slow
def test_headline_selects_rows_and_shows_seeds_and_published_figures(three_priors: Path, tmp_path: Path) -> None:
    for run in three_priors.iterdir():  # the runs on byte / 255; one more run on other levels
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["data"] = {"_target_": "vae.data.mnist", "byte_divisor": 255}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    make_run(three_priors / "other", "gaussian", 40, 0, data={"_target_": "vae.data.mnist", "byte_divisor": 256})
    spec_path = tmp_path / "headline.yaml"
    spec_path.write_text(HEADLINE_SPEC)
    out = tmp_path / "out"
    assert rep.main([str(three_priors), "--out", str(out), "--headline", str(spec_path)]) == 0
    lines = (out / "headline.md").read_text().splitlines()
    command = f"python -m surgery.report {three_priors} --out {out} --headline {spec_path}"
    assert lines[0] == f"<!-- generated by `{command}`; edit the runs or the spec, not this file -->"
    assert lines[2:7] == [
        "| prior | seeds | test log p(x), mean ± sd over seeds | published |",
        "|---|---|---|---|",
        "| Gaussian | 3 | -94.90 ± 0.10 | -84.45 ± 0.12 |",
        "| VampPrior, K = 500 | 3 | -92.90 ± 0.46 | -82.43 ± 0.06 |",
        "| flow | 2 | -91.45 ± 0.78 | — |",
    ]
    assert lines[-1] == "Published: a table."
    assert (out / "headline.png").read_bytes()[:8] == PNG_MAGIC
    assert "headline.png" not in (out / "report.md").read_text()  # the headline's picture, not the report's


def test_the_headline_picture_draws_every_seed_its_mean_and_the_published_figure(three_priors: Path) -> None:
    """headline.png: a line per headline row, the table's first on top; each seed's dot at its test
    log p(x) with its standard error, fanned out first seed on top; the mean ± sd; the published diamond."""
    from surgery.plots import new_figure

    for run in three_priors.glob("*_s1"):  # distinct standard errors, to see each drawn at its own seed
        values = json.loads((run / "surgery.json").read_text())
        values["log_likelihood_stderr"] = 0.05
        (run / "surgery.json").write_text(json.dumps(values))
    spec = rep.HeadlineSpec(
        where={"vae.latent_dim": 40}, names={"gaussian": "Gaussian"}, published={"vampprior": (-82.43, 0.06)}
    )
    ax = new_figure(7, 4).add_subplot()
    rep.draw_headline(ax, rep.headline_rows(rep.build_report([three_priors]), spec), spec)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["flow", "vampprior", "Gaussian"]  # bottom to top

    def drawn(container) -> list[tuple[float, float, float]]:  # (x, y, half-width of the x error bar)
        line, _, (bars,) = container.lines
        widths = [(seg[1][0] - seg[0][0]) / 2 for seg in bars.get_segments()]
        return [(x, y, w) for x, y, w in zip(line.get_xdata(), line.get_ydata(), widths, strict=True)]

    expected = [  # per row, top to bottom: the seeds, the mean ± sd, the published figure if any
        [(-95.0, 2.22, 0.01), (-94.9, 2.0, 0.05), (-94.8, 1.78, 0.01)],
        [(-94.9, 2.0, 0.1)],
        [(-93.0, 1.22, 0.01), (-92.4, 1.0, 0.05), (-93.3, 0.78, 0.01)],
        [(-92.9, 1.0, math.sqrt(0.21))],
        [(-82.43, 1.4, 0.06)],
        [(-92.0, 0.22, 0.01), (-90.9, -0.22, 0.05)],
        [(-91.45, 0.0, 0.55 * math.sqrt(2))],
    ]
    got = [drawn(c) for c in ax.containers]
    assert len(got) == len(expected)
    for points, want in zip(got, expected, strict=True):
        assert np.allclose(points, want, atol=1e-9), (points, want)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["a seed ± s.e. over the test points", "mean ± sd over seeds", "published ± sd"]


def test_the_headline_picture_draws_each_level_as_a_line_named_last_in_the_legend(three_priors: Path) -> None:
    from surgery.plots import new_figure

    levels = {"two-layer": -81.22, "another": -90.5}
    spec = rep.HeadlineSpec(where={"vae.latent_dim": 40}, published={"flow": (-91.0, None)}, levels=levels)
    ax = new_figure(7, 4).add_subplot()
    rep.draw_headline(ax, rep.headline_rows(rep.build_report([three_priors]), spec), spec)
    drawn = {line.get_label(): (set(line.get_xdata()), line.get_linestyle()) for line in ax.get_lines()}
    assert drawn["two-layer: -81.22"] == ({-81.22}, "--") and drawn["another: -90.50"] == ({-90.5}, ":")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "a seed ± s.e. over the test points",
        "mean ± sd over seeds",
        "published ± sd",
        "two-layer: -81.22",
        "another: -90.50",
    ]


def test_headline_mistakes_are_one_line_errors(three_priors: Path, tmp_path: Path, capsys) -> None:
    spec = tmp_path / "spec.yaml"
    for content, message in (
        ("where: {vae.latent_dim: 7}\n", "no complete run has vae.latent_dim=7"),
        ("where: {}\n", "`where` must map config keys to values"),
        ("where: {seed: 0}\ntitle: x\n", "unknown key(s) title"),
        ("where: {seed: 0}\npriors: {flow: {published: [1, 2, 3]}}\n", "priors.flow.published must be"),
        ("where: {seed: 0}\nlevels: [-81.22]\n", "`levels` must map a label to a number"),
        ("where: {seed: 0}\nlevels: {two-layer: high}\n", "`levels` must map a label to a number"),
        # A bool is an int to Python, and NaN is a float: neither is a figure to draw or compare.
        ("where: {seed: 0}\npriors: {flow: {published: true}}\n", "priors.flow.published must be"),
        ("where: {seed: 0}\npriors: {flow: {published: .nan}}\n", "priors.flow.published must be"),
        ("where: {seed: 0}\npriors: {flow: {published: [-81.5, -0.1]}}\n", "with sd >= 0"),
        ("where: {seed: 0}\nlevels: {two-layer: true}\n", "`levels` must map a label to a number"),
        ("where: {seed: 0}\nlevels: {two-layer: .inf}\n", "`levels` must map a label to a number"),
    ):
        spec.write_text(content)
        assert rep.main([str(three_priors), "--out", str(tmp_path / "out"), "--headline", str(spec)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("surgery.report: error: --headline") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written


def test_headline_where_matches_a_key_an_older_config_lacks_at_its_default(three_priors: Path) -> None:
    """`data.byte_divisor: 256` is the data function's default: a config written before the option
    existed (no byte_divisor) has it."""
    for run in three_priors.iterdir():
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        config["data"] = {"_target_": "vae.data.mnist"}
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    report = rep.build_report([three_priors])
    assert len(rep.headline_rows(report, rep.HeadlineSpec(where={"data.byte_divisor": 256}))) == 3
    assert rep.headline_rows(report, rep.HeadlineSpec(where={"data.byte_divisor": 255})) == []


@pytest.mark.slow
def test_samples_of_each_row_side_by_side(tmp_path: Path) -> None:
    make_run(tmp_path / "g", "gaussian", 10, 0, samples=True)
    make_run(tmp_path / "v", "vampprior", 10, 0, samples=True)
    make_run(tmp_path / "v1", "vampprior", 10, 1, samples=True)  # a second seed: still one panel per row
    report = rep.build_report([tmp_path])
    files = rep.write_report(report, tmp_path / "out")
    assert (tmp_path / "out" / "samples.png").read_bytes()[:8] == PNG_MAGIC
    assert "![samples](samples.png)" in files.markdown.read_text()
    assert [p.name for p in files.plots].count("samples.png") == 1


@pytest.mark.slow
def test_learning_curves_and_the_slope_of_a_run_still_going(tmp_path: Path) -> None:
    make_run(tmp_path / "done", "gaussian", 10, 0)
    running = tmp_path / "running"
    make_run(running, "vampprior", 10, 0, surgery=False)
    lines = [{"epoch": e, "complete_epoch": True, "val_elbo": -100 + 0.02 * e, "seconds": 36.0} for e in range(1, 121)]
    lines.insert(5, {"epoch": 6, "complete_epoch": False, "val_elbo": 0.0, "seconds": 1.0})  # a mid-epoch stop
    (running / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = rep.learning_curve(running / "metrics.jsonl")
    assert [e for e, _, _ in curve] == list(range(1, 121))
    assert rep.recent_slope(curve) == pytest.approx(0.02)
    report = rep.build_report([tmp_path])
    files = rep.write_report(report, tmp_path / "out")
    assert (tmp_path / "out" / "learning_curves.png").read_bytes()[:8] == PNG_MAGIC
    md = files.markdown.read_text()
    assert f"| {running} | vampprior | 10 | 0 | 120 | -97.60 (120) | +0.0200 | 1.20 |" in md


def test_an_incomplete_run_says_the_error_that_stopped_it(tmp_path: Path) -> None:
    make_run(tmp_path / "diverged", "flow", 40, 0, surgery=False, checkpoints=False)
    (tmp_path / "diverged" / "train.log").write_text(
        "[t][vae.trainer][INFO] - epoch 1\n[t][lab.run_dir][ERROR] - the run stopped: NonFiniteLossError: loss is inf\n"
    )
    problem = rep.read_run(tmp_path / "diverged").problem
    assert problem.endswith("; stopped by NonFiniteLossError: loss is inf"), problem


def test_a_rows_seeds_share_a_colour_and_differ_in_dash(tmp_path: Path) -> None:
    for name, prior, seed in (("g0", "gaussian", 0), ("f0", "flow", 0), ("g1", "gaussian", 1), ("f1", "flow", 1)):
        make_run(tmp_path / name, prior, 10, seed)
    make_run(tmp_path / "g20", "gaussian", 20, 0)  # another latent size: another row
    runs = [rep.read_run(tmp_path / n) for n in ("g0", "f0", "g1", "f1", "g20")]
    assert rep.curve_styles(runs) == [(0, "-"), (1, "-"), (0, "--"), (1, "--"), (2, "-")]


def test_variants_name_networks_by_class_and_leave_out_arithmetic_settings() -> None:
    gated = {"vae.encoder._target_=vae.networks.GatedMLPEncoder", "vae.decoder._target_=vae.networks.GatedMLPDecoder"}
    relu = {"vae.encoder._target_=vae.networks.MLPEncoder", "vae.decoder._target_=vae.networks.MLPDecoder"}
    assert rep._variants([frozenset(gated), frozenset(relu)]) == [
        "vae.decoder=GatedMLPDecoder, vae.encoder=GatedMLPEncoder",
        "vae.decoder=MLPDecoder, vae.encoder=MLPEncoder",
    ]
    # How long to train may change on a resume (each seed's epochs are shown); warm-up changes the model.
    config = {"seed": 0, "trainer": {"flush_denormal": True, "patience": 50, "max_epochs": 9, "warmup_epochs": 100}}
    assert rep.result_settings(config) == {"trainer.warmup_epochs=100"}


def test_a_setting_at_its_targets_default_groups_with_a_run_made_before_it_existed() -> None:
    old = {"data": {"_target_": "vae.data.mnist", "dynamic": True}}
    at_default = {"data": {"_target_": "vae.data.mnist", "dynamic": True, "byte_divisor": 256}}
    other = {"data": {"_target_": "vae.data.mnist", "dynamic": True, "byte_divisor": 255}}
    assert rep.result_settings(old) == rep.result_settings(at_default) == {"data._target_=vae.data.mnist"}
    assert rep.result_settings(other) == {"data._target_=vae.data.mnist", "data.byte_divisor=255"}


def test_fit_options_are_compared_among_fitted_rows_only() -> None:
    trained = frozenset({"trainer.lr=0.001", "prior._target_=Gaussian"})
    fitted = trained | {"fitted after training=true", "fit.lr=0.001"}
    groups = [
        trained,
        fitted | {"fit.rebinarize=False"},
        fitted | {"fit.rebinarize=True"},
        fitted - {"fit.lr=0.001"} | {"fit.rebinarize=True", "fit.lr=0.01"},
    ]
    assert rep._variants(groups) == [
        "",
        "fit.lr=0.001, fit.rebinarize=False, fitted after training=true",
        "fit.lr=0.001, fit.rebinarize=True, fitted after training=true",
        "fit.lr=0.01, fit.rebinarize=True, fitted after training=true",
    ]
    # One fit option shared by every fitted row is no difference; the marker still is.
    assert rep._variants([trained, fitted, fitted | {"x=1"}]) == [
        "",
        "fitted after training=true",
        "fitted after training=true, x=1",
    ]
    # An option that only newer fits record (older fit.json files lack it) is a difference.
    assert rep._variants([trained, fitted, fitted | {"fit.train_decoder=True"}]) == [
        "",
        "fitted after training=true",
        "fit.train_decoder=True, fitted after training=true",
    ]


def test_rows_on_other_data_are_not_paired(tmp_path: Path) -> None:
    mnist = {"_target_": "vae.data.mnist", "dynamic": True}
    for name, prior, data in (
        ("a", "gaussian", mnist),
        ("b", "vampprior", {**mnist, "byte_divisor": 256}),  # the default: the same points as a
        ("c", "gaussian", {**mnist, "byte_divisor": 255}),  # other grey levels: other binary points
    ):
        make_run(tmp_path / name, prior, 40, 0, data=data)
        np.save(tmp_path / name / "log_px_test.npy", np.full(50, -90.0))
    report = rep.build_report([tmp_path])
    assert len(report.rows) == 3
    assert [(p.row, p.baseline, p.same_setting) for p in report.paired] == [("vampprior", "gaussian", True)]


ROOT = Path(__file__).resolve().parents[2]
LITERATURE = "python -m surgery.report results/literature/runs --out results/literature --headline {spec}"


def test_committed_literature_report_is_what_its_runs_give(monkeypatch) -> None:
    """results/literature/report.md and headline.md (which the README shows) are regenerated from the
    committed runs, so neither can drift from them: rerun the command in headline.md's first line."""
    monkeypatch.chdir(ROOT)  # the committed report names its runs relative to the repository root
    out = Path("results/literature")
    spec = out / "headline.yaml"
    report = rep.build_report(["results/literature/runs"])
    headline = (out / "headline.md").read_text()
    command = LITERATURE.format(spec=spec)
    assert headline == rep.render_headline(report, rep.load_headline_spec(spec), command), f"run: {command}"
    committed = (out / "report.md").read_text()
    plots = [Path(line.split("(")[1].rstrip(")")) for line in committed.splitlines() if line.startswith("![")]
    assert committed == rep.render_markdown(report, plots), f"run: {command}"


def test_report_columns_follow_the_terms() -> None:
    assert rep.COLUMNS == (
        ("elbo", "ELBO"),
        ("reconstruction", "reconstruction"),
        ("avg_kl", "avg KL"),
        ("mutual_info", "MI"),
        ("marginal_kl", "marginal KL"),
        ("total_correlation", "TC"),
        ("dimwise_kl", "dim-wise KL"),
        ("optimal_prior_elbo", "optimal-prior ELBO"),
        ("log_likelihood", "test log p(x)"),
    )
