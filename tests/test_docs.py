"""The docs cannot drift from the code: the README's size and headline, and every command they show composes.

Each `python train.py ...`, `python -m surgery ...`, `python -m priors.fit ...` and
`python -m surgery.by_size ...` line in README.md and docs/*.md is composed with Hydra,
exactly as its command would compose it (an unknown option, group or value fails here);
a `python -m <module>` line of another command needs its module to exist; a `make X` line
needs the target. Sweeps (`-m a,b`) compose with each first value. Placeholders such as
`<run>` are fine: composing reads no file.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: The Hydra config each command composes.
HYDRA_COMMANDS = {
    "train.py": "train",
    "surgery": "surgery_cli",
    "priors.fit": "fit",
    "lab.fit": "fit",
    "lab.surgery": "surgery_cli",
    "surgery.by_size": "by_size",
    "lab.by_size": "by_size",
}


def commands(path: Path) -> list[tuple[str, int]]:
    """The shell commands shown in a markdown file: (command, line number), continuations joined."""
    out, pending, start = [], "", 0
    in_fence = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_fence = not in_fence
            continue
        if not (in_fence or line.startswith("    ")):
            pending = ""
            continue
        text = line.strip()
        if pending:
            pending += " " + text.rstrip("\\").strip()
            if not text.endswith("\\"):
                out.append((pending, start))
                pending = ""
            continue
        text = re.sub(r"^(OMP_NUM_THREADS=\d+\s+)", "", text)
        if re.match(r"(python|\.venv/bin/python) |make ", text):
            if text.endswith("\\"):
                pending, start = text.rstrip("\\").strip(), number
            else:
                out.append((text, number))
    return out


CASES = [(path.relative_to(ROOT).as_posix(), number, cmd) for path in DOCS for cmd, number in commands(path)]


def test_the_docs_show_commands():
    assert len(CASES) > 20


def test_the_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_the_readme_headline_is_the_reports():
    spec = importlib.util.spec_from_file_location("headline", ROOT / "scripts" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0


def overrides_of(words: list[str]) -> list[str]:
    """Hydra overrides from a command's words: comments dropped, a sweep's first values taken."""
    out = []
    for word in words:
        if word.startswith("#"):
            break
        optional = re.fullmatch(r"\[([\w.+/@-]+=.*)\]", word)  # a synopsis's optional `[key=value]`
        word = optional.group(1) if optional else word
        if word in ("-m", "--multirun") or "=" not in word or word.startswith("-"):
            continue
        key, value = word.split("=", 1)
        if "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


@pytest.mark.slow  # about a second of composing per command
@pytest.mark.parametrize(("doc", "line", "command"), CASES, ids=[f"{d}:{n}" for d, n, _ in CASES])
def test_each_command_composes(doc, line, command, compose):
    # as the shell would: placeholders filled in, `key=~/path` expanded (bash does after the `=`)
    command = re.sub(r"<[^<>]+>", "PLACEHOLDER", command).replace("=~/", "=/home/user/")
    words = shlex.split(command, comments=False)
    if words[0] == "make":
        target = words[1] if len(words) > 1 and "=" not in words[1] else "all"
        makefile = (ROOT / "Makefile").read_text()
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M) or target == "all", f"no make target {target}"
        return
    words = words[1:]
    if words[0] == "-m":
        name = words[1]
        args = words[2:]
    else:
        name = Path(words[0]).name
        args = words[1:]
    if name in ("pytest", "pip"):
        return
    if name not in HYDRA_COMMANDS:
        assert name.endswith(".py") and (ROOT / words[0]).exists() or importlib.util.find_spec(name), (
            f"{doc}:{line}: no module {name}"
        )
        return
    try:
        compose(*overrides_of(args), config=HYDRA_COMMANDS[name], hydra=True)
    except (HydraException, OmegaConfBaseException) as e:
        pytest.fail(f"{doc}:{line}: `{command}` does not compose: {e}")


def test_a_wrong_option_fails_the_check(compose):
    with pytest.raises((HydraException, OmegaConfBaseException)):
        compose(*overrides_of(["prior=nope"]), config="train", hydra=True)


@pytest.mark.slow
def test_the_report_command_of_the_headline_runs():
    out = subprocess.run([sys.executable, "-m", "surgery.report", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--headline" in out.stdout


def test_every_relative_link_resolves():
    pages = [*DOCS, ROOT / "results" / "README.md", *sorted((ROOT / "results").glob("*/README.md"))]
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
        if not target.startswith(("http://", "https://")) and not (page.parent / target).exists()
    ]
    assert broken == []


def test_every_prior_option_is_listed_where_users_look():
    """Each conf/prior option is in the README's priors table and docs/configuration.md's `prior` row."""
    options = sorted(p.stem for p in (ROOT / "conf" / "prior").glob("*.yaml"))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Priors") :].split("\n\n", 2)[1]
    row = next(
        line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines() if line.startswith("| `prior` |")
    )
    for where, text in (("README.md's priors table", table), ("docs/configuration.md's prior row", row)):
        listed = set(re.findall(r"`(\w+)`", text))
        assert set(options) <= listed, f"{where} lacks {sorted(set(options) - listed)}"
