"""Shared fixtures: sample pages made once per session, and a CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(scope="session")
def sample200(tmp_path_factory) -> Path:
    """200 synthetic pages; returns the path of pages.txt."""
    from pipeline.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample200"), 200, seed=7)


@pytest.fixture(scope="session")
def sample40(tmp_path_factory) -> Path:
    from pipeline.sample import make_sample

    return make_sample(tmp_path_factory.mktemp("sample40"), 40, seed=3)


def cli_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + str(ROOT / "tests") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_cli(*args, env: dict | None = None, timeout: float = 240, check: int | None = None):
    """Run ``pagecube ARGS`` in a subprocess; return the CompletedProcess."""
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(env), cwd=ROOT)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def manifests(pages_txt: Path) -> list[dict]:
    base = pages_txt.parent
    return [json.loads((base / line.strip()).read_text()) for line in pages_txt.read_text().splitlines() if line.strip()]


# Test hosts (issue 10): the `testhosts` (session) and `hosts` (function) fixtures.
from testhosts import hosts, testhosts  # noqa: E402,F401


# The checkout as the tests found it (issue 25: an empty slurm-logs/ was left in the repository root).
def _root_entries() -> set[str]:
    names = {p.name for p in ROOT.iterdir()}
    try:  # what git ignores (.pytest_cache, *.zarr, demo-out, ...) may come and go
        ignored = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--stdin"], input="\n".join(names),
                                 capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        ignored = []
    return names - set(ignored)


@pytest.fixture(scope="session", autouse=True)
def checkout_left_as_found():
    """No test leaves a new file or folder in the repository root."""
    before = _root_entries()
    yield
    left = _root_entries() - before
    if left:
        pytest.fail(f"tests left new entries in the repository root: {sorted(left)}", pytrace=False)
