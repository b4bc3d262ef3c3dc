"""What a newcomer meets on the command line on the first day (issue 25): Ctrl-C, usage errors,
help, a folder given as the page list, a settings mismatch, ``status --watch`` into a file."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import CLI, ROOT, cli_env
from faultkit import MODEL, index_entries, make_pages, wait_for

INTERRUPTED = "pagecube: interrupted; finished chunks are kept. Resume with the same command"


def _terminal_sigint():
    """A shell on a terminal starts a command with SIGINT at its default, whatever this test runner inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_gives_one_line_and_nothing_from_the_workers(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it, in the middle of a build on 2 local workers."""
    pages = make_pages(tmp_path / "s", 48, seed=25)
    store = tmp_path / "c.zarr"
    proc = subprocess.Popen([*CLI, "build", str(pages), "--out", str(store), "--workers", "2", "--chunk-pages", "4",
                             "--batch-size", "2", "--model", MODEL, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=cli_env({"FAULTKIT_DELAY": "0.2"}), start_new_session=True,
                            preexec_fn=_terminal_sigint)
    try:
        wait_for(lambda: len(index_entries(store)) >= 2, 120, "two finished chunks", proc)
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
