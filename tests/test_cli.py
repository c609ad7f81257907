"""The ``svlab`` command (issue 22.1): ``pip install -e .`` and the dispatcher in ``svlab/cli.py``.

The install is real: a throwaway virtual environment, ``pip install --no-deps --no-build-isolation
--no-index -e PROJECT`` (offline: setuptools and pip come from the environment running the tests), then
``svlab`` run from another folder; and a plain ``pip install`` of a copy, which has no ``tools/``. The dispatcher's own behaviour (exit statuses, ``sys`` put back,
help lines, the one line of a non-editable install) is tested in-process on throwaway tools.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import PROJECT
from svlab import cli, student_kit

# the list: what a user does outside the lab's own train.py / EER.py
SUBCOMMANDS = {"embed", "similarity", "verify", "export", "prepare", "report", "bench", "channel-probe",
               "student-kit"}


def one_line(text: str) -> str:
    return " ".join(text.split())     # argparse wraps help text


def docstring_line(path: Path) -> str:
    first = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))).strip().splitlines()[0]
    return first.replace("``", "").rstrip(".")


# --------------------------------------------------------------------------- the table and the help
def test_every_subcommand_is_an_existing_tool_or_package_module():
    assert set(cli.TOOLS) | set(cli.MODULES) == SUBCOMMANDS
    for name, file in cli.TOOLS.items():
        source = (PROJECT / "tools" / file).read_text(encoding="utf-8")
        assert 'if __name__ == "__main__":' in source, (name, file)   # a command, run as a script
    assert cli.MODULES == {"student-kit": "svlab.student_kit"}


def test_help_lists_every_subcommand_with_its_tools_docstring_line(capsys):
    assert cli.main(["--help"]) == 0
    out = one_line(capsys.readouterr().out)
    assert out.startswith("usage: svlab [-h] COMMAND")
    for name, file in cli.TOOLS.items():
        assert f"{name} {docstring_line(PROJECT / 'tools' / file)} (tools/{file})" in out, name
    assert f"student-kit {student_kit.HELP}" in out


def test_help_imports_no_tool_and_not_torch(tmp_path):
    code = ("import sys; from svlab.cli import main; rc = main(['--help']); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'numpy', 'librosa', 'verify'}); "
            "print('RESULT', rc, heavy)")
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120).stdout
    assert out.splitlines()[-1] == "RESULT 0 []"


def test_no_command_or_an_unknown_one_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err
    assert cli.main(["verfy", "a.wav"]) == 2
    assert "invalid choice: 'verfy'" in capsys.readouterr().err
    assert cli.main(["--", "verify"]) == 2


# --------------------------------------------------------------------------- running a tool
@pytest.fixture
def fake_project(tmp_path, monkeypatch):
    """A project folder (``train.py`` + ``tools/``) with throwaway tools, as ``cli.PROJECT``."""
    project = tmp_path / "project"
    (project / "tools").mkdir(parents=True)
    (project / "train.py").write_text("")
    (project / "tools" / "sibling.py").write_text("VALUE = 'from tools/'\n")
    tools = {
        "echo": """
            \"\"\"Echo: print what the tool sees, exit with the status it is given.\"\"\"
            import argparse, sys
            import sibling                       # tools/ comes first on sys.path, as for a script
            ap = argparse.ArgumentParser()
            ap.add_argument("status", type=int)
            args = ap.parse_args()
            print(ap.prog, __name__, sibling.VALUE, sys.modules["__main__"].__file__.endswith("echo.py"))
            sys.path.insert(0, "added-by-the-tool")
            sys.exit(args.status)
        """,
        "falls_off": """
            \"\"\"A tool at 100 %: its help line has a per cent sign.\"\"\"
            def f(x: int): pass                  # annotations evaluated: none of cli.py's __future__
            print("done", f.__annotations__["x"] is int)
        """,
        "message": "import sys\nsys.exit('stopped: a message')\n",
        "lab_error": "from svlab.errors import DataError\nraise DataError('bad.wav: not audio\\nfake line')\n",
    }
    for name, text in tools.items():
        (project / "tools" / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.setattr(cli, "PROJECT", project)
    monkeypatch.setattr(cli, "TOOLS", {name: f"{name}.py" for name in tools})
    return project


def test_a_tool_runs_as_a_script_and_its_exit_status_passes_through(fake_project, capsys):
    argv, path, main_module = sys.argv[:], sys.path[:], sys.modules["__main__"]
    for status in (0, 3):
        assert cli.main(["echo", str(status)]) == status
        assert capsys.readouterr().out.split() == ["svlab", "echo", "__main__", "from", "tools/", "True"]
    assert cli.main(["echo", "x"], prog="python -m svlab") == 2                     # the tool's usage error
    assert "usage: python -m svlab echo" in capsys.readouterr().err
    assert (sys.argv, sys.path, sys.modules["__main__"]) == (argv, path, main_module)   # all put back
    assert cli.main(["falls_off"]) == 0 and capsys.readouterr().out == "done True\n"
    assert cli.main(["--help"]) == 0 and "falls_off A tool at 100 %: its help" in one_line(capsys.readouterr().out)
    assert cli.main(["message"]) == 1 and capsys.readouterr().err == "stopped: a message\n"
    assert cli.main(["lab_error"]) == 2                        # outside a tool's own guard: still one line
    assert capsys.readouterr().err == "error: bad.wav: not audio\\nfake line\n"


def test_a_real_tools_usage_names_the_subcommand(capsys):
    before = os.environ.get("TQDM_DISABLE")                 # verify.py sets it when run as __main__
    try:
        assert cli.main(["verify", "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: svlab verify ") and "--checkpoint" in out and "--enroll" in out
        assert cli.main(["prepare", "--root"]) == 2
        assert capsys.readouterr().err.startswith("usage: svlab prepare ")
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)


def test_without_the_project_folder_a_tool_subcommand_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "PROJECT", tmp_path)         # site-packages: no tools/ beside the package
    (tmp_path / "tools").mkdir()                          # ... or another distribution's tools/: not ours
    (tmp_path / "tools" / "verify.py").write_text("raise SystemExit(99)\n")
    assert cli.main(["verify", "a.wav", "b.wav"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith("error: svlab verify needs the project folder (it runs tools/verify.py there)")
    assert err.rstrip().endswith("from the project folder, install with `pip install -e .`")
    assert cli.main(["--help"]) == 0                      # the list still shows, each line saying so
    out = one_line(capsys.readouterr().out)
    assert "verify (needs the project folder: tools/verify.py; install with `pip install -e .` there)" in out
    assert f"student-kit {student_kit.HELP}" in out       # a package subcommand works anywhere
    assert cli.main(["student-kit", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: svlab student-kit [-h] --out OUT")
    assert cli.main(["student-kit", "--out", str(tmp_path / "kit")]) == 2     # would copy site-packages
    assert capsys.readouterr().err.startswith("error: svlab student-kit needs the project folder (it works on")
    assert not (tmp_path / "kit").exists()


def test_a_missing_tool_file_is_named(fake_project, monkeypatch, capsys):
    monkeypatch.setitem(cli.TOOLS, "gone", "gone.py")
    assert cli.main(["gone"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "gone.py, which is missing" in err
    assert cli.main(["--help"]) == 0 and "gone (tools/gone.py is missing)" in one_line(capsys.readouterr().out)


def test_student_kit_keeps_its_usage_and_exit_status(capsys):
    assert cli.main(["student-kit"]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


# --------------------------------------------------------------------------- pyproject.toml
def requirement_names(lines) -> list[str]:
    return [re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.strip().startswith("#")]


def test_pyproject_installs_the_package_and_the_script_with_requirements_txt_deps():
    meta = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))
    project = meta["project"]
    assert project["name"] == "svlab" and project["scripts"] == {"svlab": "svlab.cli:main"}
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["svlab*"]
    assert set(meta["tool"]["setuptools"]["package-data"]["svlab"]) == {
        "pretrained/*.pth", "pretrained/*.onnx", "pretrained/*.json"}
    assert requirement_names(project["optional-dependencies"]["onnx"]) == ["onnxruntime", "onnx", "onnxscript"]
    # requirements.txt is the same list, spelled the same (the lab installs it with pip install -r)
    in_txt = (PROJECT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    declared = project["dependencies"] + project["optional-dependencies"]["onnx"]
    assert sorted(line.strip() for line in in_txt if line.strip() and not line.startswith("#")) == sorted(declared)
    assert requirement_names(declared)[0] == "torch"


# --------------------------------------------------------------------------- the real install
def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def make_venv(base: Path) -> dict:
    """A new venv that sees the packages of the environment running the tests; how to run things in it.

    ``--system-site-packages`` would expose the base interpreter's packages, not those of the
    environment running the tests (itself a venv), so a ``.pth`` file adds the latter's site folders:
    torch & co. without a download, and the pip and setuptools that build the install."""
    venv, elsewhere = base / "venv", base / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    made = run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], base, env)
    if made.returncode != 0:
        pytest.skip(f"python -m venv does not work here: {made.stderr.strip()[-300:]}")
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base, env)
    ours = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    # plain entries: their own .pth files (an editable svlab installed there, say) stay out of this venv
    (Path(purelib.stdout.strip()) / "lab_packages.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(ours)))
    # setuptools >= 70.1 builds the editable wheel itself; older ones need the wheel package
    probe = ("import importlib.util, sys, setuptools, pip; v = tuple(map(int, setuptools.__version__.split('.')[:2])); "
             "sys.exit(0 if v >= (70, 1) or importlib.util.find_spec('wheel') else 3)")
    tools = run([str(python), "-c", probe], base, env)
    if tools.returncode != 0:
        pytest.skip("no offline build here: the test environment lacks pip, or setuptools >= 70.1 (or setuptools "
                    "with wheel) " + tools.stderr.strip()[-300:])
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return dict(python=str(python), svlab=str(venv / "bin" / "svlab"), cwd=elsewhere, env=env, venv=venv)


def pip_install(i: dict, *target: str) -> None:
    pip = run([i["python"], "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", *target], i["cwd"], i["env"], timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed editable (``pip install -e PROJECT``) into a new venv."""
    i = make_venv(tmp_path_factory.mktemp("svlab_install"))
    pip_install(i, "-e", str(PROJECT))
    return i


def test_pip_install_e_puts_svlab_on_path_and_the_package_imports_anywhere(installed):
    i = installed
    where = run(["sh", "-c", "command -v svlab"], i["cwd"], i["env"])
    assert where.stdout.strip() == i["svlab"]
    imported = run([i["python"], "-c", "import svlab, svlab.cli; print(svlab.__file__); print(svlab.cli.tools_dir())"],
                   i["cwd"], i["env"])
    assert imported.stdout.splitlines() == [str(PROJECT / "svlab" / "__init__.py"), str(PROJECT / "tools")]
    lab_file = run([i["python"], "-c", "import train"], i["cwd"], i["env"])     # only svlab is installed
    assert lab_file.returncode == 1 and "No module named 'train'" in lab_file.stderr


def test_installed_svlab_help_and_student_kit_help(installed):
    i = installed
    listed = run(["svlab", "--help"], i["cwd"], i["env"])
    assert listed.returncode == 0 and listed.stdout.startswith("usage: svlab [-h] COMMAND")
    assert all(f"    {name}" in listed.stdout for name in SUBCOMMANDS)
    kit = run(["svlab", "student-kit", "--help"], i["cwd"], i["env"])
    assert kit.returncode == 0 and kit.stdout.startswith("usage: svlab student-kit [-h] --out OUT")
    module = run([i["python"], "-m", "svlab", "--help"], i["cwd"], i["env"])
    assert module.returncode == 0 and module.stdout.startswith("usage: python -m svlab [-h] COMMAND")


def test_installed_svlab_prepare_writes_manifests_relative_to_the_working_folder(installed):
    i = installed
    rng = np.random.default_rng(0)
    for s in range(5):
        for u in range(3):
            path = i["cwd"] / "corpus" / f"spk{s}" / f"u{u}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(path), rng.uniform(-0.3, 0.3, 800).astype(np.float32), 16000)
    done = run(["svlab", "prepare", "--root", "corpus", "--out", "manifests", "--train_speakers", "3",
                "--test_speakers", "2", "--utts_per_speaker", "3", "--test_utts_per_speaker", "3"],
               i["cwd"], i["env"])
    assert done.returncode == 0, done.stderr
    train = (i["cwd"] / "manifests" / "split_train_set.txt").read_text().split("\n")[:-1]
    test = (i["cwd"] / "manifests" / "test_set.txt").read_text().split("\n")[:-1]
    trials = [line.split() for line in (i["cwd"] / "manifests" / "trials.txt").read_text().splitlines()]
    assert len(train) == 9 and len({line.split()[0] for line in train}) == 3
    assert len(test) == 6 and len({line.split()[0] for line in test}) == 2
    assert len(trials) == 15 and sum(t[2] == "1" for t in trials) == 6       # C(6,2) pairs, 2 x C(3,2) target
    again = run(["svlab", "prepare", "--root", "no_such_corpus"], i["cwd"], i["env"])
    assert again.returncode == 2 and len(again.stderr.splitlines()) == 1 and "no_such_corpus" in again.stderr


def untrained_checkpoint(path: Path) -> Path:
    """A real checkpoint of a narrow x-vector (random weights): enough for verify to score with."""
    import torch
    from svlab import checkpoint, config, features, models
    cfg = config.load_config(overrides={"model.channels": 32, "model.embedding_size": 16, "features.n_mfcc": 20})
    torch.manual_seed(0)
    checkpoint.save_checkpoint({"format": checkpoint.FORMAT, "epoch": 1, "config": config.public_config(cfg),
                                "model_state": models.build_model(cfg["model"], 20).state_dict(),
                                "speakers": ["S00", "S01"], "history": [], "tag": "xvector_gap_softmax",
                                "features": features.feature_signature(cfg["features"])}, path)
    return path


def test_installed_svlab_verify_prints_what_tools_verify_prints(installed, monkeypatch, capsys):
    import verify                                         # tools/verify.py (conftest puts tools/ on sys.path)
    i = installed
    untrained_checkpoint(i["cwd"] / "model.pth")
    rng = np.random.default_rng(1)
    for name in ("a.wav", "b.wav"):
        sf.write(str(i["cwd"] / name), rng.uniform(-0.3, 0.3, 16000).astype(np.float32), 16000)
    args = ["a.wav", "b.wav", "--checkpoint", "model.pth", "--threshold", "0.5", "--gpu", "-1"]
    via_svlab = run(["svlab", "verify", *args], i["cwd"], i["env"])
    monkeypatch.chdir(i["cwd"])
    assert verify.main(args) == via_svlab.returncode == 0, via_svlab.stderr
    direct = capsys.readouterr().out
    assert via_svlab.stdout == direct and "decision: ACCEPT" in direct    # random weights: nearly equal embeddings


def test_a_plain_install_ships_the_library_and_the_model_not_the_tools(tmp_path):
    """``pip install .`` (from a copy: a build writes build/ and *.egg-info beside the sources)."""
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((PROJECT / name).read_bytes())
    shutil.copytree(PROJECT / "svlab", source / "svlab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (source / "svlab" / "pretrained").mkdir(exist_ok=True)
    for name in ("model.onnx", "model.json", "notes.txt"):
        (source / "svlab" / "pretrained" / name).write_text("{}")
    i = make_venv(tmp_path)
    pip_install(i, str(source))
    found = run([i["python"], "-c", "import svlab; print(svlab.__file__)"], i["cwd"], i["env"]).stdout.strip()
    package = Path(found).parent
    assert package.parent.name == "site-packages" and not (package.parent / "tools").exists()
    assert (package / "nets" / "resnet.py").is_file() and (package / "cli.py").is_file()
    shipped = {p.name for p in (PROJECT / "svlab" / "pretrained").iterdir() if p.suffix in (".pth", ".onnx", ".json")}
    assert sorted(p.name for p in (package / "pretrained").iterdir()) == sorted(shipped | {"model.json", "model.onnx"})
    listed = run(["svlab", "--help"], i["cwd"], i["env"])
    assert listed.returncode == 0 and "(needs the project folder: tools/verify.py" in one_line(listed.stdout)
    refused = run(["svlab", "verify", "a.wav", "b.wav"], i["cwd"], i["env"])
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"error: svlab verify needs the project folder (it runs tools/verify.py there), and this svlab ({package}) "
        "is installed without it: from the project folder, install with `pip install -e .`"]
