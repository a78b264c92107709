"""lab/run_dir.py: the directory lock, what a refused run leaves behind, fresh-run and resume checks, and the
run directory's own files (resumes.jsonl, the config, the log)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lab.run_dir
from lab.run_dir import (
    HYDRA_FILE,
    MACHINE_KEYS,
    RunDirLock,
    check_fresh,
    code_version,
    flatten,
    format_setting,
    log_to_file,
    made_by_hydra,
    matches_any,
    missing_dirs,
    read_code,
    record_code,
    record_resume,
    remove_empty_dirs,
    resume_changes,
    stop_reason,
    write_config,
)
from vae.checkpoint import RunDirError


def test_a_held_lock_refuses_a_second_holder_with_the_pid_and_is_free_again_after(tmp_path: Path) -> None:
    with RunDirLock(tmp_path) as lock:
        lock.claim()
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
        # flock locks belong to an open file: a second open is refused even in this process.
        with pytest.raises(RunDirError, match=rf"^{tmp_path} is in use by another run \(PID {os.getpid()}\); wait"):
            with RunDirLock(tmp_path):
                pass
    with RunDirLock(tmp_path) as again:  # released when the block ended
        again.claim()
    assert (tmp_path / ".lock").exists()


def test_a_refused_run_leaves_the_directory_as_it_was(tmp_path: Path) -> None:
    made_by_hydra = [tmp_path / "a"]  # what Hydra created before the lock was taken
    made_by_hydra[0].mkdir()
    run_dir = tmp_path / "a" / "b" / "c"
    with RunDirLock(run_dir, created=made_by_hydra):
        assert (run_dir / ".lock").is_file()
    assert list(tmp_path.iterdir()) == []  # .lock, c, b and a removed, deepest first
    kept = tmp_path / "kept"
    with RunDirLock(kept) as lock:
        lock.claim()
    assert sorted(p.name for p in kept.iterdir()) == [".lock"]


def test_a_refused_run_keeps_a_lock_file_and_directories_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("")
    (tmp_path / "train.log").write_text("someone else's")
    with RunDirLock(tmp_path):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "train.log"]


def test_a_directory_that_cannot_be_made_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file where a folder goes")
    with pytest.raises(
        RunDirError, match=rf"^cannot use {tmp_path / 'file' / 'run'} as the run directory: .*hydra.run.dir"
    ):
        with RunDirLock(tmp_path / "file" / "run"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_dirs_and_remove_empty_dirs(tmp_path: Path) -> None:
    deep = tmp_path / "x" / "y" / "z"
    assert missing_dirs(deep) == [deep, deep.parent, deep.parent.parent]
    deep.mkdir(parents=True)
    (tmp_path / "x" / "keep.txt").write_text("")
    remove_empty_dirs(missing_dirs(tmp_path / "none") + [deep, deep.parent, deep.parent.parent])
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["keep.txt"]  # stopped at the first non-empty


def test_check_fresh_refuses_a_directory_that_holds_a_run(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    check_fresh(tmp_path)  # a config alone is no run
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match=r"already holds a run .*trainer.resume=true.*hydra.run.dir="):
        check_fresh(tmp_path)


STORED = {
    "seed": 0,
    "prior": {"_target_": "priors.gaussian.GaussianPrior"},
    "trainer": {"max_epochs": 2, "resume": False, "optimizer": {"lr": 0.001}},
    "logger": {"_target_": "vae.loggers.NullLogger"},
}


def test_a_resume_may_change_how_long_and_how_verbosely_it_trains() -> None:
    new = {
        **STORED,
        "trainer": {"max_epochs": 5, "resume": True, "optimizer": {"lr": 0.001}, "progress": False},
        "logger": {"_target_": "vae.loggers.WandbLogger", "project": "p"},
        "device": "cuda",
    }
    new["trainer"]["optimizer"]["fused"] = True  # the same update, in one kernel
    assert resume_changes(STORED, new, "last.pt") == {
        "device": [None, "cuda"],
        "logger._target_": ["vae.loggers.NullLogger", "vae.loggers.WandbLogger"],
        "logger.project": [None, "p"],
        "trainer.max_epochs": [2, 5],
        "trainer.optimizer.fused": [None, True],
        "trainer.progress": [None, False],
    }
    assert resume_changes(STORED, STORED, "last.pt") == {}


def test_a_resume_that_changes_what_is_trained_is_refused_naming_each_change() -> None:
    new = {**STORED, "seed": 1, "trainer": {**STORED["trainer"], "optimizer": {"lr": 0.01}}}
    with pytest.raises(
        RunDirError,
        match=r"^cannot resume from runs/a/last.pt: the config differs in what it trained with "
        r"\(seed: 0 -> 1, trainer.optimizer.lr: 0.001 -> 0.01\); resume with the same settings, or start",
    ):
        resume_changes(STORED, new, Path("runs/a/last.pt"))
    dropped = {k: v for k, v in STORED.items() if k != "seed"}
    with pytest.raises(RunDirError, match=r"seed: 0 -> \(absent\)"):
        resume_changes(STORED, dropped, "last.pt")


def test_an_option_added_since_the_checkpoint_resumes_only_at_its_default() -> None:
    stored = {"prior": {"_target_": "priors.exemplar.ExemplarPrior", "k": 10}}
    at_default = {"prior": {"_target_": "priors.exemplar.ExemplarPrior", "k": 10, "gradient": True}}
    assert resume_changes(stored, at_default, "last.pt") == {"prior.gradient": [None, True]}
    changed = {"prior": {"_target_": "priors.exemplar.ExemplarPrior", "k": 10, "gradient": False}}
    with pytest.raises(RunDirError, match=r"prior.gradient: \(absent\) -> False\); .*\(prior.gradient=true on the"):
        resume_changes(stored, changed, "last.pt")
    unknown = {"prior": {"_target_": "priors.exemplar.ExemplarPrior", "k": 10, "no_such_option": 1}}
    with pytest.raises(RunDirError, match="no_such_option"):
        resume_changes(stored, unknown, "last.pt")


def test_flat_settings() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}
    assert matches_any("logger.project", ("logger.",)) and matches_any("device", ("device",))
    assert not matches_any("loggerx", ("logger.",)) and not matches_any("device.index", ("device",))
    assert format_setting("prior", "mixture") == "prior=mixture"
    assert format_setting("sizes", [1, 2]) == "sizes=[1, 2]" and format_setting("flag", True) == "flag=true"
    assert format_setting("node", {"b": 1, "a": None}) == 'node={"a": null, "b": 1}'


def test_each_resume_is_one_line_of_resumes_jsonl(tmp_path: Path) -> None:
    record_resume(tmp_path, 14, {"trainer.max_epochs": [1, 2]})
    record_resume(tmp_path, 28, {})
    first, second = (json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines())
    assert (first["step"], first["changed"], second["step"], second["changed"]) == (
        14,
        {"trainer.max_epochs": [1, 2]},
        28,
        {},
    )
    assert len(first["time"]) == len("2026-01-01T00:00:00")


def test_the_config_is_written_resolved(tmp_path: Path) -> None:
    write_config(tmp_path, OmegaConf.create({"a": 3, "b": "${a}"}))
    write_config(tmp_path / "plain", {"x": [1, 2]})
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / ".hydra" / "config.yaml")) == {"a": 3, "b": 3}
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / "plain" / ".hydra" / "config.yaml")) == {"x": [1, 2]}


def test_committed_runs_keep_hydras_choices_but_no_machine_paths() -> None:
    records = sorted((Path(lab.run_dir.__file__).parents[1] / "results").rglob(str(HYDRA_FILE)))
    assert records, "no committed run has a Hydra record"
    for path in records:
        runtime = OmegaConf.to_container(OmegaConf.load(path))["hydra"]["runtime"]
        assert "prior" in runtime["choices"] and not set(MACHINE_KEYS) & set(runtime), path


def test_the_log_file_gets_what_is_logged_while_the_block_runs(tmp_path: Path) -> None:
    log = logging.getLogger("tests.run_dir")
    log.setLevel(logging.INFO)
    with log_to_file(tmp_path / "train.log"):
        log.info("inside")
    log.info("after")
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith("[tests.run_dir][INFO] - inside")


def test_the_error_that_ends_the_run_is_the_logs_last_line_and_only_there(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(ValueError), log_to_file(tmp_path / "train.log"):
        logging.getLogger("tests.run_dir").info("epoch 1")
        raise ValueError("loss is inf at step 14\n(epoch 1)")
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[-1].endswith("[lab.run_dir][ERROR] - the run stopped: ValueError: loss is inf at step 14 (epoch 1)")
    assert len(lines) == 2 and [r.getMessage() for r in caplog.records] == ["epoch 1"]
    assert stop_reason(tmp_path / "train.log") == "ValueError: loss is inf at step 14 (epoch 1)"
    with log_to_file(tmp_path / "train.log"):  # resumed: the run went on, the error is past
        logging.getLogger("tests.run_dir").info("resumed")
    assert stop_reason(tmp_path / "train.log") is None and stop_reason(tmp_path / "none.log") is None
    with pytest.raises(SystemExit), log_to_file(tmp_path / "train.log"):
        sys.exit(0)
    assert stop_reason(tmp_path / "train.log") is None
    with pytest.raises(KeyboardInterrupt), log_to_file(tmp_path / "train.log"):
        raise KeyboardInterrupt
    assert stop_reason(tmp_path / "train.log") == "KeyboardInterrupt"


def test_hydras_directories_are_noted_and_an_unwritable_parent_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    record = lab.run_dir.RecordRunDir()
    run_dir = tmp_path / "new" / "run"
    record.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    assert made_by_hydra(run_dir) == [run_dir, run_dir.parent] and made_by_hydra(run_dir) == []  # taken once
    monkeypatch.setattr(lab.run_dir.os, "access", lambda path, mode: False)
    with pytest.raises(SystemExit) as info:
        record.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        f"train.py: error: cannot create the run directory {run_dir}: {tmp_path} is not writable; "
        "give the run a directory it can write (hydra.run.dir=...)\n"
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to make the repositories")
def test_code_version_reads_the_commit_and_digests_the_sources(tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    (repo / "priors").mkdir(parents=True)
    outside.mkdir()

    def git(*args: str, at: Path = repo) -> str:
        command = ["git", "-C", str(at), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (repo / "train.py").write_text("x = 1\n")
    (repo / "priors" / "p.py").write_text("y = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    first = code_version(repo)
    assert first["commit"] == git("rev-parse", "HEAD") and first["torch"] == torch.__version__
    (repo / "README.md").write_text("not code\n")
    assert code_version(repo)["sources_sha256"] == first["sources_sha256"]
    (repo / "priors" / "p.py").write_text("y = 2\n")  # uncommitted: same commit, other sources
    changed = code_version(repo)
    assert changed["commit"] == first["commit"] and changed["sources_sha256"] != first["sources_sha256"]
    git("commit", "-q", "-am", "second")
    second = git("rev-parse", "HEAD")
    assert code_version(repo)["commit"] == second != first["commit"]
    git("pack-refs", "--all")  # the branch now only in packed-refs
    assert not any((repo / ".git" / "refs" / "heads").iterdir())
    assert code_version(repo)["commit"] == second
    git("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), first["commit"])
    assert code_version(tmp_path / "wt") == first  # a worktree: its own HEAD, detached
    git("checkout", "-q", "-b", "side", at=tmp_path / "wt")  # on a branch of the main repo's refs
    assert code_version(tmp_path / "wt")["commit"] == first["commit"]
    assert code_version(outside)["commit"] is None

    record_code(tmp_path, 0, root=repo)
    record_code(tmp_path, 14, root=outside)
    lines = [json.loads(x) for x in (tmp_path / "code.jsonl").read_text().splitlines()]
    assert [(x["step"], x["commit"]) for x in lines] == [(0, second), (14, None)]


def test_read_code_returns_what_record_code_wrote_and_names_a_bad_line(tmp_path: Path) -> None:
    assert read_code(tmp_path) is None  # a run made before code.jsonl was kept
    outside = tmp_path / "src"
    (outside / "priors").mkdir(parents=True)
    (outside / "priors" / "p.py").write_text("y = 1\n")
    record_code(tmp_path, 0, root=outside)
    (outside / "priors" / "p.py").write_text("y = 2\n")
    record_code(tmp_path, 500, root=outside)
    lines = read_code(tmp_path)
    assert [x["step"] for x in lines] == [0, 500] and lines[0]["commit"] is None
    assert lines[0]["sources_sha256"] != lines[1]["sources_sha256"]
    with open(tmp_path / "code.jsonl", "a") as f:
        f.write('{"step": 9}\n')
    with pytest.raises(ValueError, match="code.jsonl, line 3: not a record of the code"):
        read_code(tmp_path)
