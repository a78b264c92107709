"""`python -m surgery.report` on fake run dirs: values, incomplete runs, plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from surgery import report as rep

ESTIMATES = (
    "elbo",
    "reconstruction",
    "avg_kl",
    "mutual_info",
    "marginal_kl",
    "total_correlation",
    "dimwise_kl",
    "prior_mismatch_remainder",
    "optimal_prior_elbo",
    "log_likelihood",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_surgery(seed: int, latent_dim: int, prior: str) -> dict:
    """Distinct, exactly checkable numbers per run; a non-factorized prior has a remainder and no dimwise_kl."""
    base = {"gaussian": 0.0, "vampprior": 3.0}[prior] + latent_dim
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
    out.update({f"{k}_stderr": 0.01 for k in ESTIMATES})
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
) -> dict | None:
    (path / ".hydra").mkdir(parents=True)
    target = {"gaussian": "priors.gaussian.GaussianPrior", "vampprior": "priors.vampprior.VampPrior"}[prior]
    config = {"seed": seed, "vae": {"latent_dim": latent_dim}, "prior": {"_target_": target}}
    if data is not None:
        config["data"] = data
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"prior": prior}}}}))
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
    table = [line for line in md.splitlines() if line.startswith("| gaussian") or line.startswith("| vampprior")]
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
        assert cells[-3:] == ["3", "5–7", "train"]


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
    import numpy as np

    rng = np.random.default_rng(0)
    hardness = rng.normal(-90, 20, size=500)  # shared by both models: cancels in the pairing
    a = hardness + 2.0 + rng.normal(0, 0.5, size=500)
    b = hardness + rng.normal(0, 0.5, size=500)
    for name, prior, values in (("a", "vampprior", a), ("b", "gaussian", b)):
        make_run(tmp_path / name, prior, 40, 0)
        np.save(tmp_path / name / "log_px_test.npy", values)
    report = rep.build_report([tmp_path])
    (pair,) = report.paired
    d = b - a  # the gaussian row comes first, so a = gaussian
    assert (pair.a, pair.b, pair.n_points) == ("gaussian, z=40", "vampprior, z=40", 500)
    assert pair.mean == pytest.approx(d.mean(), abs=1e-12)
    assert pair.stderr == pytest.approx(d.std(ddof=1) / np.sqrt(500), rel=1e-9)
    assert pair.stderr < 0.1 < 20 / np.sqrt(500)  # far below the unpaired spread
    assert f"| gaussian, z=40 | vampprior, z=40 | {d.mean():+.3f} ± {pair.stderr:.3f} | 500 |" in rep.render_markdown(
        report
    )


def test_samples_of_each_row_side_by_side(tmp_path: Path) -> None:
    make_run(tmp_path / "g", "gaussian", 10, 0, samples=True)
    make_run(tmp_path / "v", "vampprior", 10, 0, samples=True)
    make_run(tmp_path / "v1", "vampprior", 10, 1, samples=True)  # a second seed: still one panel per row
    report = rep.build_report([tmp_path])
    files = rep.write_report(report, tmp_path / "out")
    assert (tmp_path / "out" / "samples.png").read_bytes()[:8] == PNG_MAGIC
    assert "![samples](samples.png)" in files.markdown.read_text()
    assert [p.name for p in files.plots].count("samples.png") == 1


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


def test_variants_name_networks_by_class_and_leave_out_arithmetic_settings() -> None:
    gated = {"vae.encoder._target_=vae.networks.GatedMLPEncoder", "vae.decoder._target_=vae.networks.GatedMLPDecoder"}
    relu = {"vae.encoder._target_=vae.networks.MLPEncoder", "vae.decoder._target_=vae.networks.MLPDecoder"}
    assert rep._variants([frozenset(gated), frozenset(relu)]) == [
        "vae.decoder=GatedMLPDecoder, vae.encoder=GatedMLPEncoder",
        "vae.decoder=MLPDecoder, vae.encoder=MLPEncoder",
    ]
    config = {"seed": 0, "trainer": {"flush_denormal": True, "patience": 50}}
    assert rep.result_settings(config) == {"trainer.patience=50"}


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


def test_rows_on_other_data_are_not_paired(tmp_path: Path) -> None:
    import numpy as np

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
    assert [(p.a, p.b) for p in report.paired] == [("gaussian, z=40", "vampprior, z=40")]
