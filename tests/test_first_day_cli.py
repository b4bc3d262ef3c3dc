"""What a newcomer meets on the command line on the first day (issue 25): Ctrl-C, usage errors,
help, a folder given as the page list, a settings mismatch, ``status --watch`` into a file."""
from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import CLI, ROOT, cli_env
from faultkit import MODEL, index_entries, make_pages, wait_for

INTERRUPTED = "pagecube: interrupted; finished chunks are kept. Resume with the same command"


def _terminal_sigint():
    """A shell on a terminal starts a command with SIGINT at its default, whatever this test runner inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("start", ["forked", "spawned"])
def test_ctrl_c_gives_one_line_and_nothing_from_the_workers(tmp_path, start):
    """SIGINT to the whole process group, as a terminal sends it, in the middle of a build on 2 local
    workers: forked from the forkserver (CPU workers), or spawned (as GPU workers are)."""
    pages = make_pages(tmp_path / "s", 48, seed=25)
    store = tmp_path / "c.zarr"
    proc = subprocess.Popen([*CLI, "build", str(pages), "--out", str(store), "--workers", "2", "--chunk-pages", "4",
                             "--batch-size", "2", "--model", MODEL, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=cli_env({"FAULTKIT_DELAY": "0.2",
                                         **({"PAGECUBE_WORKER_START": "spawn"} if start == "spawned" else {})}),
                            start_new_session=True,
                            preexec_fn=_terminal_sigint)
    try:
        wait_for(lambda: len(index_entries(store)) >= 1, 120, "a finished chunk", proc)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith(INTERRUPTED)]
    assert len(at) == 1, err
    assert lines[at[0]:] == [lines[at[0]]], f"output after the interrupted line:\n{err}"
    assert all(line.startswith("pagecube: ") for line in lines), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


# --- usage errors and help ---------------------------------------------------------------------

def _commands() -> dict:
    import typer

    from pipeline.cli.commands import app

    return typer.main.get_command(app).commands


def _one_usage_line(*args) -> str:
    from faultkit import run

    code, out, err = run(*args)
    assert code == 2, (args, code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagecube: error: "), (args, err)
    assert "Usage:" not in err and "Try " not in err, (args, err)
    return lines[0]


def test_every_usage_error_is_one_line_with_what_to_do():
    commands = _commands()
    assert {"build", "status", "summary", "sample", "show", "similar", "diagnose"} <= set(commands)
    for name, command in commands.items():
        required = [p for p in command.params if p.param_type_name == "argument" and p.required]
        if required:  # a missing argument names it, with the usage line
            line = _one_usage_line(name)
            assert f"'{required[0].name.upper()}'" in line and f"usage: pagecube {name} [OPTIONS]" in line, line
        line = _one_usage_line(name, "x", "--zzz")  # an unknown option
        assert "no such option --zzz" in line and f"see pagecube {name} -h" in line, line
    line = _one_usage_line("build", "pages.txt", "--out", "c.zarr", "--worker", "2")
    assert line == "pagecube: error: no such option --worker for pagecube build; did you mean --workers?"
    line = _one_usage_line("build", "pages.txt", "--out", "c.zarr", "--workers", "two")  # a bad value
    assert "'--workers'" in line and line.endswith("see pagecube build -h"), line
    assert "--port" in _one_usage_line("status", "c.zarr", "--serve", "--port", "70000")
    assert "'--out'" in _one_usage_line("build", "pages.txt")  # a missing option
    assert "did you mean 'build'" in _one_usage_line("biuld", "pages.txt").lower()  # a misspelt command


def test_help_shows_flags_as_flags_and_arguments_in_capitals():
    from faultkit import run

    for name, command in _commands().items():
        code, out, err = run(name, "--help")
        assert code == 0, err
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        args = [p for p in command.params if p.param_type_name == "argument"]
        pieces = [p.name.upper() if p.required else f"[{p.name.upper()}]" for p in args]
        assert usage.split("Usage:")[1].split() == ["pagecube", name, "[OPTIONS]", *pieces], usage
        assert "<bool>" not in out and "{" not in usage, out
        flags = [p.opts[0] for p in command.params if getattr(p, "is_flag", False) and p.opts[0] != "--help"]
        for flag in flags:
            row = next(line for line in out.splitlines() if f" {flag} " in line)
            assert "<" not in row, row  # no type label beside a flag
    line = _one_usage_line("build", "pages.txt", "--out", "c.zarr", "--overwrite", "true")
    assert line.startswith("pagecube: error: --overwrite takes no value (got 'true')"), line


# --- a folder given as the page list -----------------------------------------------------------

def test_a_folder_as_the_page_list_says_what_to_pass(sample40, tmp_path):
    import shutil

    folder = sample40.parent
    line = _one_usage_line("build", folder, "--out", tmp_path / "c.zarr", "--cluster", "sync")
    assert line == (f"pagecube: error: {folder} is a folder, not a page list: pass its page list {folder}/pages.txt, "
                    f"or a quoted glob of its manifests, '{folder}/manifests/*.json'")
    bare = tmp_path / "bare"  # manifests only, no list file
    shutil.copytree(folder / "manifests", bare / "manifests")
    line = _one_usage_line("build", bare, "--out", tmp_path / "c.zarr", "--cluster", "sync")
    assert f"pass a quoted glob of its manifests, '{bare}/manifests/*.json'" in line, line
    assert not (tmp_path / "c.zarr").exists()
    assert _one_usage_line("build", tmp_path / "none", "--out", tmp_path / "c.zarr", "--cluster", "sync") == \
        f"pagecube: error: page list not found: {tmp_path / 'none'}"


# --- a store made with other settings ----------------------------------------------------------

def test_other_settings_are_refused_before_any_cluster_with_short_digests(sample40, tmp_path):
    import re

    from conftest import run_cli
    from faultkit import run

    store = tmp_path / "s.zarr"
    code, _, err = run("build", sample40, "--out", store, "--cluster", "sync", "--model", "tiny", "--init-only")
    assert code == 0, err
    checkpoint = tmp_path / "other.pt"
    checkpoint.write_bytes(bytes(range(256)) * 8)
    import hashlib

    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    cases = {("--seed", "1"): "weights_digest 'seed:0' (store) vs 'seed:1' (this build)",
             ("--checkpoint", checkpoint): f"weights_digest 'seed:0' (store) vs '{sha[:12]}' (this build)",
             ("--embedding-dtype", "float16"): "embedding_dtype 'float32' (store) vs 'float16' (this build)",
             ("--embedding-dim", "32"): "embedding_dim 128 (store) vs 32 (this build)"}
    for i, (args, why) in enumerate(cases.items()):
        # on a local cluster (in a process of its own): refused before it starts, no dashboard line
        if i < 2:
            proc = run_cli("build", sample40, "--out", store, "--workers", "1", "--no-progress", *args, check=2)
            err = proc.stderr
        else:
            code, _, err = run("build", sample40, "--out", store, "--cluster", "sync", *args)
            assert code == 2, err
        assert err.splitlines() == [f"pagecube: error: store {store} was made with different settings: "
                                    f"{why}; use --overwrite to start afresh (or a new --out)"], err
        assert not re.search(r"[0-9a-f]{13,}", err), err
    assert not (store / "_pagecube" / "lock.json").exists()
    from pipeline.resume_check import short_digest

    assert short_digest("ab" * 32) == "ab" * 6 and short_digest("seed:3") == "seed:3" and short_digest(128) == 128


# --- status --watch into a file ----------------------------------------------------------------

def test_status_watch_off_a_terminal_prints_a_line_per_interval_with_the_index_rate(tmp_path):
    """``status --watch`` with its output in a pipe, during a build held at a known pace (batches of 4
    pages, 0.5 s each on one thread: at most 8 pages/s): plain lines while it runs, flushed one by one."""
    import re
    import time

    from faultkit import popen_build

    pages = make_pages(tmp_path / "s", 48, seed=26)
    store = tmp_path / "w.zarr"
    build = popen_build(pages, store, "--cluster", "sync", "--chunk-pages", "8", "--batch-size", "4",
                        "--model", MODEL, extra_env={"FAULTKIT_DELAY": "0.5"})
    watch = None
    try:
        wait_for(lambda: len(index_entries(store)) >= 1, 90, "a finished chunk", build)
        watch = subprocess.Popen([*CLI, "status", str(store), "--watch", "--every", "0.5"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
        first = watch.stdout.readline()  # blocks until the first line comes: not at the end of the build
        assert build.poll() is None, "the build ended before the watch printed anything"
        got = re.fullmatch(r"\d\d:\d\d:\d\d  building  done (\d+)/48 \([\d.]+%\)  failed 0  pending (\d+)  "
                           r"rate ([\d.]+) pages/s  ETA ([\d.]+) min\n", first)
        assert got, first
        rate = float(got.group(3))
        assert 0.5 <= rate <= 8 * 1.5, first  # the pace the build is held at, not milliseconds between stamps
        assert float(got.group(4)) * 60 >= int(got.group(2)) / 8 * 0.9, first  # no ETA of 0 with pages pending
        assert build.wait(timeout=120) == 0, build.stderr.read()
        out, err = watch.communicate(timeout=60)
    finally:
        for proc in (build, watch):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert watch.returncode == 0, err
    lines = (first + out).splitlines()
    plain = [ln for ln in lines if "  building  " in ln]
    assert len(plain) >= 2, lines  # one per interval while the build ran
    final = lines[lines.index(f"store    {store}"):]  # then the final status, once
    assert final[1:3] == ["pages    48  done 48 (100.0%)  failed 0  pending 0", "writer   unlocked"], out


# --- the checkout as the tests found it --------------------------------------------------------

def test_an_offline_job_script_makes_no_log_folder(tmp_path, monkeypatch):
    """``log_directory: slurm-logs`` (as in examples/slurm.yaml): the script names it, nothing makes it
    (dask-jobqueue makes it when a job is made: an empty slurm-logs/ was left in the checkout)."""
    from cluster.specs import slurm_job_script

    monkeypatch.chdir(tmp_path)
    for kind, directive in (("slurm", "#SBATCH -e slurm-logs/dask-worker-%J.err"), ("pbs", "#PBS -e slurm-logs/")):
        script = slurm_job_script({"kind": kind, "cores": 1, "memory": "1GB", "log_directory": "slurm-logs"})
        assert directive in script, script
        assert "jobqueue-logs-" not in script
    assert list(tmp_path.iterdir()) == []
