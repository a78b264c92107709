"""A checkpoint's stored config never instantiates an untrusted `_target_`, nor chooses a file or a size.

Each test crafts a checkpoint from a tiny honest one and checks that `load_model` refuses it
with one line, and that the harm it was built for (a marker file) never happens; the controls
show that each crafted node really does harm when instantiated without the check.
"""

from __future__ import annotations

import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

import vae.data
from lab.checkpoint import AllocationBudget, BudgetExceeded, CheckpointError, data_options, load_model, run_dir_of
from lab.surgery import surgery_main
from lab.trust import UntrustedTargetError, check_trusted, is_trusted, parse_allow, trust_problem
from tests.conftest import MINIMAL
from train import train
from vae.data import DataError
from vae.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def writes_file(marker: Path) -> dict:
    """A config node that, instantiated, writes `marker`: the attack in the issue."""
    return {
        "_target_": "pathlib.Path.write_text",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"],
    }


def test_the_crafted_node_really_writes_a_file_when_instantiated(tmp_path):
    # The control: without the check, this node is harmful, so the tests below can fail.
    marker = tmp_path / "control"
    hydra.utils.instantiate(OmegaConf.create(writes_file(marker)))
    assert marker.read_text() == "pwned"


def train_tiny(compose, run_dir: Path, *overrides: str) -> Path:
    cfg = compose(
        *MINIMAL,
        "trainer.max_steps=2",
        *overrides,
    )
    train(cfg, run_dir=run_dir)
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def checkpoint(compose, tmp_path_factory) -> Path:
    return train_tiny(compose, tmp_path_factory.mktemp("run"))


def tampered(checkpoint: Path, out: Path, edit, weights=None) -> Path:
    payload = torch.load(checkpoint, weights_only=True)
    edit(payload["config"])
    if weights is not None:
        weights(payload["model"])
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, out)
    return out


# ---- a user's package, as in the issue ---------------------------------------------------

MYPKG = {
    # The issue's package: it imports torch and pathlib, so `mypkg.torch.load` and
    # `mypkg.pathlib.Path.write_text` reach them as attributes.
    "__init__.py": "import pathlib\nimport torch\n\nfrom mypkg.priors import MyPrior\n",
    "priors.py": (
        "from priors.gaussian import GaussianPrior\n\n\n"
        "class MyPrior(GaussianPrior):\n    '''A user's prior: the standard normal under its own name.'''\n"
    ),
    "helpers.py": (
        "def make_prior(latent_dim):\n    return None\n\n\n"
        "class Helper:\n    def __init__(self, **kwargs):\n        pass\n"
    ),
}


def purge_mypkg() -> None:
    for name in [n for n in sys.modules if n == "mypkg" or n.startswith("mypkg.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def mypkg(tmp_path_factory) -> Path:
    """`mypkg` on sys.path; `mypkg.loud` writes `<root>/imported` when imported, `evilmod` too."""
    root = tmp_path_factory.mktemp("site")
    (root / "mypkg").mkdir()
    for name, text in MYPKG.items():
        (root / "mypkg" / name).write_text(text)
    loud = f"import pathlib\npathlib.Path({str(root / 'imported')!r}).write_text('imported')\n"
    (root / "mypkg" / "loud.py").write_text(loud + "class Loud:\n    pass\n")
    (root / "evilmod.py").write_text(loud)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    purge_mypkg()


@pytest.fixture
def evil_pickle(tmp_path) -> tuple[Path, Path]:
    """(a pickle that creates a marker file when unpickled, the marker)."""
    marker = tmp_path / "unpickled"
    pkl = tmp_path / "evil.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(_Opens(marker), f, protocol=2)
    return pkl, marker


class _Opens:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def chain(pkl: Path, marker: Path, how: str) -> dict:
    """The issue's chain through `mypkg`'s imports: unpickle with `torch.load`, or write a file with pathlib."""
    if how == "torch.load":
        return {"_target_": "mypkg.torch.load", "f": str(pkl), "weights_only": False}
    return {
        "_target_": "mypkg.pathlib.Path.write_text",
        "_args_": [{"_target_": "mypkg.pathlib.Path", "_args_": [str(marker)]}, "pwned"],
    }


@pytest.mark.parametrize("how", ["torch.load", "write_text"])
def test_the_chain_through_mypkg_really_does_harm_when_instantiated(mypkg, evil_pickle, how):
    pkl, marker = evil_pickle
    try:
        hydra.utils.instantiate(OmegaConf.create(chain(pkl, marker, how)))
    except hydra.errors.InstantiationException:
        assert how == "torch.load"  # it fails on the file's format, after the pickle has run
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch.load", "write_text"])
@pytest.mark.parametrize("node", ["prior", "vae.encoder", "data", "trainer.optimizer"])
@pytest.mark.parametrize("allow", [["mypkg.*"], ["mypkg"], ["mypkg.priors"]])
def test_allow_mypkg_never_reaches_what_mypkg_imports(checkpoint, mypkg, evil_pickle, tmp_path, how, node, allow):
    pkl, marker = evil_pickle

    def edit(config):
        parent, _, key = node.rpartition(".")
        target = config
        for part in filter(None, parent.split(".")):
            target = target[part]
        target[key] = chain(pkl, marker, how)

    with pytest.raises(UntrustedTargetError) as refused:
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit), allow=allow)
    message = str(refused.value)
    assert "\n" not in message and "mypkg." in message and "allow=[" not in message  # nothing to propose
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    [
        "mypkg.torch.load",
        "mypkg.torch.nn.Module",
        "mypkg.torch.nn.Linear",
        "mypkg.pathlib.Path",
        "mypkg.torch.optim.SGD",
    ],
)
def test_a_star_never_follows_an_import(mypkg, target):
    problem = trust_problem(target, parse_allow(["mypkg.*"]))
    assert problem is not None and "imported into mypkg" in problem


def test_functions_and_other_classes_under_an_allowed_package_are_refused(mypkg):
    names = parse_allow(["mypkg.*"])
    assert "function" in trust_problem("mypkg.helpers.make_prior", names)
    assert "neither a torch.nn.Module nor a torch optimizer" in trust_problem("mypkg.helpers.Helper", names)
    assert trust_problem("mypkg.priors.MyPrior", names) is None
    assert trust_problem("mypkg.MyPrior", names) is None  # re-exported, defined in mypkg.priors: inside mypkg
    # A class named exactly: only that class; a re-export is named where it is defined, or by the package.
    assert trust_problem("mypkg.priors.MyPrior", parse_allow(["mypkg.priors.MyPrior"])) is None
    problem = trust_problem("mypkg.MyPrior", parse_allow(["mypkg.MyPrior"]))
    assert "defined outside mypkg.MyPrior" in problem and problem.endswith("pass allow=[mypkg]")


def test_looking_up_imports_nothing_outside_the_allowed_names(mypkg):
    purge_mypkg()
    for target, allow in [("evilmod.Thing", []), ("mypkg.loud.Loud", ["mypkg.priors"]), ("mypkg.loud.Loud", [])]:
        assert trust_problem(target, parse_allow(allow)) is not None
    assert not (mypkg / "imported").exists() and "mypkg" not in sys.modules


@pytest.mark.parametrize(
    ("allow", "message"),
    [
        ("mypkg.*", r"the string 'mypkg.\*'; write allow=\[mypkg.\*\], with the brackets"),
        ("*", "the string"),
        ("", "the string"),
        (["*"], "dotted module or class name"),
        (["**"], "dotted module or class name"),
        (["mypkg*"], "dotted module or class name"),
        (["mypkg.*.sub"], "dotted module or class name"),
        (["my pkg"], "dotted module or class name"),
        ([""], "non-empty"),
        ([3], "non-empty module or class names, got 3"),
        ([["mypkg"]], "non-empty"),
        ({"mypkg": 1}, "got dict"),
        (["builtins"], "standard library or a library that can run code"),
        (["os.*"], "standard library"),
        (["torch.*"], "can run code"),
        (["torch.nn.Linear"], "can run code"),
        (["numpy"], "can run code"),
        (["hydra.utils"], "can run code"),
        (["omegaconf"], "can run code"),
        (["pickle"], "standard library"),
        (["subprocess"], "standard library"),
        (["importlib"], "standard library"),
        (["shutil"], "standard library"),
        (["pathlib.Path"], "standard library"),
        (["priors.*"], "priorlab's own package"),
        (["_posixsubprocess"], "standard library"),
    ],
)
def test_allow_is_a_list_of_safe_names(tmp_path, allow, message):
    with pytest.raises(ConfigError, match=message):
        parse_allow(allow)
    # load_model checks it first, before it reads any file (this one does not exist).
    with pytest.raises(ConfigError, match="allow"):
        load_model(tmp_path / "nope.pt", allow=allow)


def test_a_bare_string_allow_no_longer_trusts_everything(checkpoint, tmp_path):
    # As a string, 'mypkg.*' was its characters, and '*' matched every target.
    marker = tmp_path / "pwned"
    evil = tampered(checkpoint, tmp_path / "evil.pt", lambda c: c.__setitem__("prior", writes_file(marker)))
    with pytest.raises(ConfigError, match="the string"):
        load_model(evil, allow="mypkg.*")
    with pytest.raises(ConfigError, match="allow holds '.', which is refused"):
        load_model(evil, allow=list("mypkg.*"))  # its characters as a list: '*' is no name either
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "allow", "proposed"),
    [
        ("mypkg.priors.MyPrior", [], "mypkg.priors.MyPrior"),  # the exact class, never the whole package
        ("examples.student_t_prior.StudentTPrior", [], "examples.student_t_prior.StudentTPrior"),
        ("priors.base.torch.load", [], None),  # priorlab's own package, through an import
        ("vae.trainer.torch.save", [], None),
        ("lab.surgery.write_json", [], None),
        ("os.system", [], None),
        ("builtins.open", [], None),
        ("builtins.exec", [], None),
        ("torch.load", [], None),
        ("shutil.copy", [], None),
        ("pathlib.Path.write_text", [], None),
        ("subprocess.Popen", [], None),
        ("numpy.load", [], None),
        ("hydra.utils.instantiate", [], None),
        ("mypkg.torch.load", ["mypkg"], None),
        ("mypkg.helpers.make_prior", ["mypkg"], None),
    ],
)
def test_the_refusal_proposes_only_the_narrowest_safe_name(mypkg, target, allow, proposed):
    problem = trust_problem(target, parse_allow(allow), where="prior")
    assert problem is not None and "\n" not in problem
    if proposed is None:
        assert "allow=" not in problem
    else:
        assert problem.endswith(f"pass allow=[{proposed}]")
        parse_allow([proposed])  # what it proposes is itself a valid allow


@pytest.mark.slow
def test_a_users_class_needs_allow_and_loads_with_its_name_or_package(compose, mypkg, tmp_path):
    user = train_tiny(compose, tmp_path / "run", "prior._target_=mypkg.priors.MyPrior")
    purge_mypkg()
    with pytest.raises(UntrustedTargetError, match=r"pass allow=\[mypkg\.priors\.MyPrior\]$"):
        load_model(user)
    assert "mypkg" not in sys.modules  # refused by its name, before any import
    stored = torch.load(user, weights_only=True)["model"]
    for allow in (["mypkg.priors.MyPrior"], ["mypkg.priors"], ["mypkg"], ["mypkg.*"], ("mypkg.*",)):
        model, _, _ = load_model(user, allow=allow)
        assert type(model.prior).__name__ == "MyPrior"
        assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_the_example_prior_loads_with_allow(compose, tmp_path):
    user = train_tiny(compose, tmp_path / "run", "prior._target_=examples.student_t_prior.StudentTPrior")
    with pytest.raises(UntrustedTargetError, match=r"allow=\[examples\.student_t_prior\.StudentTPrior\]"):
        load_model(user)
    model, _, _ = load_model(user, allow=OmegaConf.create({"a": ["examples.*"]}).a)  # as Hydra passes it
    assert type(model.prior).__name__ == "StudentTPrior"


# ---- the whole stored config -------------------------------------------------------------


@pytest.mark.parametrize("node", ["data", "prior", "vae.encoder"])
def test_a_crafted_checkpoint_never_writes_its_file(checkpoint, tmp_path, node):
    marker = tmp_path / "pwned"

    def edit(config):
        parent, _, key = node.rpartition(".")
        target = config
        for part in filter(None, parent.split(".")):
            target = target[part]
        target[key] = writes_file(marker)

    evil = tampered(checkpoint, tmp_path / "evil.pt", edit)
    with pytest.raises(UntrustedTargetError, match="pathlib.Path.write_text"):
        load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("node", ["trainer", "logger", "surgery", "evil", "trainer.optimizer"])
def test_targets_are_checked_in_every_node_not_three(checkpoint, tmp_path, node):
    marker = tmp_path / "pwned"

    def edit(config):
        parent, _, key = node.rpartition(".")
        holder = config[parent] if parent else config
        holder[key] = {**holder.get(key, {}), "_target_": "builtins.open", "_args_": [str(marker), "w"]}

    with pytest.raises(UntrustedTargetError, match=f"'builtins.open' at {node},"):
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("target", "own_node"),
    [
        ("vae.trainer.Trainer", "trainer"),
        ("vae.callbacks.TrainingSetEncodings", "trainer.callbacks[0]"),
        ("vae.loggers.WandbLogger", "logger"),
        ("vae.data.mnist", "data"),
    ],
)
def test_recorded_targets_and_factories_are_trusted_only_where_priorlab_writes_them(target, own_node):
    assert trust_problem(target, (), where=own_node) is None
    others = {"prior", "vae.encoder", "trainer.optimizer", "data", "trainer", "logger", "trainer.callbacks[1]"}
    for where in others - {own_node}:
        assert trust_problem(target, (), where=where) is not None


def test_a_new_checkpoint_records_the_default_callback_and_loads_but_no_other_callback(checkpoint, tmp_path):
    stored = torch.load(checkpoint, weights_only=True)["config"]["trainer"]["callbacks"]
    assert stored == [{"_target_": "vae.callbacks.TrainingSetEncodings"}]
    load_model(checkpoint)  # recorded, never built, and trusted where the trainer writes it

    def callbacks(*targets):
        return lambda c: c["trainer"].__setitem__("callbacks", [{"_target_": t} for t in targets])

    refused = [
        (("vae.trainer.Trainer",), r"'vae.trainer.Trainer' at trainer.callbacks\[0\]"),
        (("builtins.open",), r"'builtins.open' at trainer.callbacks\[0\]"),
        (
            ("vae.callbacks.TrainingSetEncodings",) * 2,
            r"'vae.callbacks.TrainingSetEncodings' at trainer.callbacks\[1\]",
        ),
        (("mypkg.MyCallback", "vae.callbacks.TrainingSetEncodings"), r"'mypkg.MyCallback' at trainer.callbacks\[0\]"),
    ]
    for i, (targets, message) in enumerate(refused):
        with pytest.raises(UntrustedTargetError, match=message):
            load_model(tampered(checkpoint, tmp_path / f"{i}.pt", callbacks(*targets)))
    assert trust_problem("vae.callbacks.TrainingSetEncodings") is not None  # not a module: never built


def test_a_nested_target_is_checked_too(checkpoint, tmp_path):
    marker = tmp_path / "pwned"

    def edit(config):
        config["prior"]["layer"] = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}

    with pytest.raises(UntrustedTargetError, match="builtins.open.*prior.layer"):
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))
    assert not marker.exists()


def test_an_interpolation_that_could_build_a_target_is_refused(checkpoint, tmp_path):
    def edit(config):
        config["data"] = "${oc.decode:'{_target_: os.system, _args_: [true]}'}"

    with pytest.raises(UntrustedTargetError, match="interpolation at data"):
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda c: c["trainer"].__setitem__("note", "${oc.env:SECRET}"), "trainer.note"),
        (lambda c: c["logger"].__setitem__("tags", ["ok", "${oc.env:SECRET}"]), r"logger.tags\[1\]"),
        (lambda c: c.__setitem__("secret", "${oc.env:HOME}"), "secret"),
        (lambda c: c["surgery"].__setitem__("${oc.env:SECRET}", 1), "surgery.\\$"),
        (lambda c: c["trainer"].__setitem__("x", "a${b.${c.${d}}}"), "trainer.x"),
    ],
)
def test_an_interpolation_anywhere_is_refused_before_omegaconf_sees_it(checkpoint, tmp_path, monkeypatch, edit, where):
    monkeypatch.setenv("SECRET", "hunter2")
    with pytest.raises(UntrustedTargetError, match=f"interpolation .*{where}") as refused:
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))
    assert "hunter2" not in str(refused.value)


@pytest.mark.slow
def test_a_config_nested_100000_levels_deep_is_refused_fast(checkpoint, tmp_path):
    deep: dict = {"leaf": 1}
    deeper: list = [1]
    for _ in range(100_000):
        deep, deeper = {"a": deep}, [deeper]
    for nested in (deep, deeper):
        started = time.perf_counter()
        with pytest.raises(UntrustedTargetError, match="nests deeper than 32 levels"):
            check_trusted({"data": {}, "vae": {}, "prior": {}, "trainer": {"x": nested}})
        assert time.perf_counter() - started < 0.5
    # Through a file (as deep as torch.save can write): refused the same way.
    shallow: dict = {"leaf": 1}
    for _ in range(200):
        shallow = {"a": shallow}
    with pytest.raises(UntrustedTargetError, match=r"nests deeper .*\(at trainer\.x(\.a)+\)"):
        load_model(tampered(checkpoint, tmp_path / "deep.pt", lambda c: c["trainer"].__setitem__("x", shallow)))


def test_a_config_too_wide_or_holding_odd_values_is_refused(checkpoint, tmp_path):
    with pytest.raises(UntrustedTargetError, match="more than 10,000 values"):
        check_trusted({"trainer": list(range(20_000))})
    with pytest.raises(UntrustedTargetError, match="holds a Tensor at trainer.x"):
        load_model(tampered(checkpoint, tmp_path / "t.pt", lambda c: c["trainer"].__setitem__("x", torch.zeros(2))))
    with pytest.raises(UntrustedTargetError, match="non-string key 3 at trainer"):
        load_model(tampered(checkpoint, tmp_path / "k.pt", lambda c: c["trainer"].__setitem__(3, 1)))


# ---- no stored value chooses a file -------------------------------------------------------


def as_mnist(config, **stored):
    config["data"] = {"_target_": "vae.data.mnist", "dynamic": True, "seed": 0, "byte_divisor": 256, **stored}


def test_a_stored_cache_dir_or_path_is_never_used(checkpoint, tmp_path, monkeypatch):
    calls = []

    def fetch(cache_dir=None):
        calls.append(cache_dir)
        raise DataError("offline in this test")

    monkeypatch.setattr(vae.data, "fetch_mnist", fetch)
    elsewhere = tmp_path / "anywhere" / "cache"
    evil = tampered(checkpoint, tmp_path / "evil.pt", lambda c: as_mnist(c, path="/dev/zero", cache_dir=str(elsewhere)))
    with pytest.raises(DataError, match="offline in this test.*pass data_path="):
        load_model(evil)  # /dev/zero would hang; the stored cache_dir would be created and written
    assert calls == [None] and not elsewhere.parent.exists()

    options = data_options(torch.load(evil, weights_only=True)["config"]["data"], "~/mine.pkl.gz", evil)
    assert options["path"] == "~/mine.pkl.gz" and options["cache_dir"] is None


@pytest.mark.parametrize("stored", ["/etc/passwd", None])
def test_npz_data_need_data_path_on_the_command_line(checkpoint, tmp_path, stored):
    def edit(config):
        config["data"] = {"_target_": "vae.data.npz", "path": stored, "seed": 0}

    with pytest.raises(DataError, match="pass data_path=") as refused:
        load_model(tampered(checkpoint, tmp_path / "evil.pt", edit))
    assert (stored or "need a file") in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"_target_": "vae.data.npz", "_args_": ["/etc/passwd"]}, "holds '_args_'"),
        ({"_target_": "vae.data.digits", "path": "/etc/passwd"}, "holds 'path', which vae.data.digits does not take"),
        ({"_target_": "vae.data.mnist", "path": {"file": "/etc/passwd"}}, "data option path is a node"),
        ({"_target_": "priors.gaussian.GaussianPrior"}, "must be one of priorlab's dataset factories"),
    ],
)
def test_the_data_node_may_hold_only_its_factorys_options(checkpoint, tmp_path, data, message):
    with pytest.raises(CheckpointError, match=message):
        load_model(tampered(checkpoint, tmp_path / "evil.pt", lambda c: c.__setitem__("data", data)))


# ---- outputs go next to the checkpoint only in priorlab's layout ---------------------------------


def test_outputs_go_next_to_the_checkpoint_only_in_a_priorlab_run_dir(checkpoint, tmp_path):
    assert run_dir_of(checkpoint) == checkpoint.parent.parent
    loose = tmp_path / "downloads" / "model.pt"
    nested = tmp_path / "home" / "checkpoints" / "best.pt"  # the right folder name, but no run beside it
    for path in (loose, nested):
        path.parent.mkdir(parents=True)
        shutil.copy(checkpoint, path)
        with pytest.raises(CheckpointError, match="not in a priorlab run directory.*output_dir=DIR"):
            run_dir_of(path)
        with pytest.raises(CheckpointError, match="with out_dir=DIR$"):
            run_dir_of(path, "out_dir")
    (tmp_path / "home" / "metrics.jsonl").write_text("")
    assert run_dir_of(nested) == tmp_path / "home"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_dir_of(tmp_path / "nope.pt")


def test_the_surgery_refuses_a_loose_checkpoint_before_any_work(compose, checkpoint, tmp_path, monkeypatch):
    loose = tmp_path / "a" / "b" / "model.pt"
    loose.parent.mkdir(parents=True)
    shutil.copy(checkpoint, loose)
    (tmp_path / "surgery.json").write_text("theirs")
    monkeypatch.setattr("lab.surgery.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    cfg = compose(f"checkpoint={loose}", "device=cpu", config="surgery_cli")
    with pytest.raises(CheckpointError, match="output_dir=DIR$"):
        surgery_main(cfg)
    assert (tmp_path / "surgery.json").read_text() == "theirs" and sorted(tmp_path.rglob("*")) == sorted(
        [tmp_path / "a", tmp_path / "a" / "b", loose, tmp_path / "surgery.json"]
    )


def test_by_size_settles_its_output_before_loading(compose, checkpoint, tmp_path, monkeypatch):
    from lab.by_size import by_size_main

    monkeypatch.setattr("lab.by_size.load_model", lambda *a, **k: pytest.fail("loaded before refusing"))
    loose = tmp_path / "model.pt"
    shutil.copy(checkpoint, loose)
    with pytest.raises(CheckpointError, match="output_dir=DIR$"):
        by_size_main(compose(f"checkpoint={loose}", "device=cpu", config="by_size"))
    with pytest.raises(ConfigError, match="output_dir=.* is a file, not a directory"):
        by_size_main(compose(f"checkpoint={checkpoint}", f"output_dir={loose}", "device=cpu", config="by_size"))
    with pytest.raises(ConfigError, match="checkpoint is required"):
        by_size_main(compose(config="by_size"))


# ---- weights: finite, and sizes bounded by them ----------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, value):
    def weights(state):
        key = next(k for k in state if k.startswith("decoder") and k.endswith("weight"))
        state[key].view(-1)[3] = value
        weights.key = key

    evil = tampered(checkpoint, tmp_path / "evil.pt", lambda c: None, weights)
    with pytest.raises(CheckpointError, match=rf"weight {weights.key} holds 1 NaN or infinite value\(s\)"):
        load_model(evil)


def test_stored_sizes_past_the_weights_are_refused_before_allocation(checkpoint, tmp_path):
    # 1,000,000-wide hidden layers: 4 TB for the middle layer. Were the refusal to come after
    # the allocation, torch.empty would fail here with a RuntimeError, not BudgetExceeded.
    def edit(config):
        for net in ("encoder", "decoder"):
            config["vae"][net]["hidden_dims"] = [1_000_000, 1_000_000]

    evil = tampered(checkpoint, tmp_path / "evil.pt", edit)
    assert evil.stat().st_size < 3_000_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB
    with pytest.raises(BudgetExceeded, match=r"shape \[1000000, 64\] \(256.0 MB\).*stored sizes") as refused:
        load_model(evil)
    assert "\n" not in str(refused.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # under 100 MB more


def test_the_budget_refuses_an_allocation_before_it_happens_and_lets_honest_builds_through():
    with pytest.raises(BudgetExceeded, match="would allocate a tensor of shape"):
        with AllocationBudget(10**6, "x"):
            torch.empty(10**6, 10**6)  # 4 TB: unguarded, torch itself would fail to allocate
    with AllocationBudget(10**6, "x") as guard:
        x = torch.zeros(1000)
        x.add_(1)  # in place: nothing new
        x.view(10, 100).t()  # views: nothing new
    assert guard.used == 4000
    from priors.flow import FlowPrior

    with AllocationBudget(10**7, "x"):  # its MADE masks read values (.item()): counted after they run
        FlowPrior(2, num_layers=2, hidden_features=8)
    with pytest.raises(BudgetExceeded):
        with AllocationBudget(10**5, "x"):
            FlowPrior(2, num_layers=2, hidden_features=1000)


# ---- what still loads -------------------------------------------------------------------------


def test_an_honest_checkpoint_loads(checkpoint):
    model, data, cfg = load_model(checkpoint)
    assert cfg.prior._target_ == "priors.gaussian.GaussianPrior" and data.data_dim == 64
    stored = torch.load(checkpoint, weights_only=True)["model"]
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("target", "trusted"),
    [
        ("priors.gaussian.GaussianPrior", True),
        ("vae.data.mnist", True),
        ("torch.optim.Adam", True),
        ("vae.optim.AdamNormGrad", True),
        ("nflows.transforms.MaskedAffineAutoregressiveTransform", True),
        ("lab.surgery.write_json", False),  # priorlab's own, but a function that writes a file
        ("vae.trainer.save_checkpoint", False),
        ("priors.base.torch.load", False),  # torch's, reached through priorlab's import
        ("priors.base.torch.nn.Linear", False),
        ("torch.load", False),
        ("os.system", False),
        ("priors.no_such_module.Thing", False),
        ("priors..gaussian", False),
    ],
)
def test_is_trusted(target, trusted):
    assert is_trusted(target) is trusted


def test_check_trusted_names_the_path_of_the_bad_node():
    with pytest.raises(UntrustedTargetError, match=r"'os.system' at vae.layers\[1\]"):
        check_trusted({"vae": {"layers": [{"_target_": "torch.optim.SGD"}, {"_target_": "os.system"}]}})


# ---- the command lines ------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_refuses_in_one_line_and_allow_lets_it_through(checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    evil = tampered(checkpoint, tmp_path / "evil.pt", lambda c: c.__setitem__("data", writes_file(marker)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "surgery",
            f"checkpoint={evil}",
            "device=cpu",
            "is_samples=5",
            "is_points=5",
            f"output_dir={tmp_path}",
            "plots=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and not marker.exists()
    assert done.stderr.strip().count("\n") == 0 and "pathlib.Path.write_text" in done.stderr
    assert not (tmp_path / "surgery.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "allow", "said"),
    [
        (["surgery", "is_samples=5", "is_points=5", "plots=false"], "allow=mypkg.*", "allow=[mypkg.*], with the"),
        (["priors.fit", "prior=gaussian"], "allow=[mypkg.*]", "mypkg.torch is the module torch imported into"),
        (["surgery.by_size", "plots=false"], "allow=[mypkg.*]", "mypkg.torch is the module torch imported into"),
    ],
)
def test_the_issues_chain_fails_through_every_cli(checkpoint, mypkg, evil_pickle, tmp_path, command, allow, said):
    pkl, marker = evil_pickle
    evil = tampered(
        checkpoint,
        tmp_path / "run" / "checkpoints" / "best.pt",
        lambda c: c.__setitem__("prior", chain(pkl, marker, "torch.load")),
    )
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    out = "out_dir" if command[0] == "priors.fit" else "output_dir"
    done = subprocess.run(
        [sys.executable, "-m", command[0], f"checkpoint={evil}", "device=cpu", allow, f"{out}={tmp_path / 'out'}"]
        + command[1:],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(mypkg), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().count("\n") == 0 and said in done.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
