"""The wheel is a real package: it ships the world's data and works outside the repository.

One module-scoped fixture builds the wheel offline (``pip wheel --no-deps --no-build-isolation
--no-index``) from a copy of the working tree, so a stale ``build/`` or ``*.egg-info`` in the
checkout can neither leak into it nor be left behind; creates a fresh virtual environment
without pip; and installs the wheel into it with ``--no-deps``, using this interpreter's pip
(``pip --python``). Nothing can be downloaded, so the project's dependencies come from the
running environment's site-packages through a ``.pth`` file. A plain path line in a ``.pth``
is not itself scanned for ``.pth`` files, so the editable install living there stays inert:
the fresh venv's ``minidpo`` is the wheel's, which the tests check before relying on it.
Every command then runs from a working directory outside the repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
# Not part of a build's input: caches, environments, outputs, a previous build's leftovers.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".ruff_cache", ".hypothesis", ".ipynb_checkpoints",
)  # fmt: skip


def _env() -> dict[str, str]:
    """The environment for every subprocess: nothing that could put the repo on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"{proc.args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def _data_files() -> list[str]:
    """Every file under the top-level data/ folder, relative to it, in POSIX form."""
    return sorted(
        p.relative_to(DATA).as_posix()
        for p in DATA.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    # Found, not imported (importing setuptools here would trip its distutils shim).
    # --no-build-isolation builds with this environment's setuptools.
    for tool in ("pip", "setuptools"):
        if importlib.util.find_spec(tool) is None:
            pytest.skip(f"{tool} is not installed in this environment")
    tmp = tmp_path_factory.mktemp("package")

    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=_NOT_SOURCE)
    wheels = tmp / "wheels"
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--no-index", "-w", wheels, "."], cwd=src))  # fmt: skip
    (wheel,) = wheels.glob("minidpo-*.whl")

    venv = tmp / "venv"
    _check(_run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp))
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = next(p for p in (bin_dir / "python", bin_dir / "python.exe") if p.exists())
    site = Path(
        _check(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=tmp)).stdout.strip()
    )  # fmt: skip
    deps = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "_minidpo_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    _check(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
                 "--no-index", "--ignore-installed", "--no-warn-script-location", wheel],
                cwd=tmp))  # fmt: skip

    elsewhere = tmp / "elsewhere"  # the working directory of every command below
    elsewhere.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "bin": bin_dir, "cwd": elsewhere}


def test_wheel_contains_the_world_data(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    expected = _data_files()
    assert "gravity_example.json" in expected and "explain/paraphrases.json" in expected
    assert any(f.startswith("explain/topics/") for f in expected)
    missing = [f for f in expected if f"minidpo/data/{f}" not in names]
    assert not missing, f"data files missing from the wheel (extend package-data): {missing}"


def test_installed_package_is_the_wheel_not_the_repo(installed):
    code = (
        "import json, minidpo, minidpo.gravity as g, minidpo.world as w;"
        "print(json.dumps([minidpo.__file__, str(w.DEFAULT_DATA_DIR), str(g.DEFAULT_PATH),"
        " len(w.load_world().topics)]))"
    )
    out = _check(_run([installed["python"], "-c", code], cwd=installed["cwd"])).stdout
    package, data_dir, example, n_topics = json.loads(out.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    for path in (package, data_dir, example):
        resolved = Path(path).resolve()
        assert resolved.is_relative_to(venv), f"{path} is not inside the fresh venv {venv}"
        assert not resolved.is_relative_to(REPO), f"{path} is inside the repository"
    assert Path(data_dir).parent == Path(package).parent / "data"
    assert n_topics == len(list((DATA / "explain" / "topics").glob("*.json")))


def test_minidpo_gravity_from_the_wheel(installed):
    proc = _check(_run([installed["bin"] / "minidpo", "gravity"], cwd=installed["cwd"]))
    assert "0.5769" in proc.stdout  # sigma(beta h), the worked example's row 5
    assert "0.5501" in proc.stdout  # -log sigma(beta h), row 6


def test_minidpo_score_from_the_wheel(installed):
    fact = json.loads((DATA / "explain" / "topics" / "gravity.json").read_text())["facts"][0]
    proc = _run([installed["bin"] / "minidpo", "score", "Explain gravity.", fact],
                cwd=installed["cwd"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "oracle reward" in proc.stdout
    assert re.search(r"oracle reward [+-]\d+\.\d+", proc.stdout), proc.stdout
    assert "fact" in proc.stdout  # the sentence was found in the installed world
