"""Start-up: what ``pagecube build`` does before its first page, in fresh interpreters (no mocks).

A local build waits for its workers' forkserver to import torch; these tests hold the three things
that keep that wait short: the server starts before the command's own imports, the modules every
worker re-imports stay light, and forked workers never walk the objects the server imported.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python(code: str) -> list:
    """Run ``code`` in a fresh interpreter from the project root; its last stdout line, parsed as JSON."""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cli_package_and_model_registry_import_nothing_heavy():
    """Every local worker re-imports the console script's module (``pipeline.cli``), and the build
    reads the registry before it starts the workers: neither may import typer, numpy or torch."""
    heavy = python(
        "import json, sys\n"
        "import pipeline.cli, pipeline.startup, pipeline.model.registry\n"
        "from pipeline.model.registry import BUILTIN, default_model\n"
        "default_model()\n"
        "print(json.dumps([m for m in ('typer', 'click', 'numpy', 'torch', 'distributed', 'importlib.metadata')"
        " if m in sys.modules]))\n")
    assert heavy == []


def test_build_starts_the_workers_forkserver_before_the_commands_are_imported():
    seen = python(
        "import json, sys\n"
        "from multiprocessing import forkserver\n"
        "from pipeline.cli import start_build_workers_early as early\n"
        "pid = lambda: forkserver._forkserver._forkserver_pid\n"
        "out = [early(['build', 'p', '--out', 's', '--cluster', 'sync']), pid(),\n"
        "       early(['build', 'p', '--out', 's', '--device=cuda']), early(['build', '--help']),\n"
        "       early(['status', 's']), pid()]\n"
        "out += [early(['build', 'p', '--out', 's', '--device', 'cpu', '--model=tiny']), pid() is not None,\n"
        "        'typer' in sys.modules, 'torch' in sys.modules]\n"
        "print(json.dumps(out))\n")
    # sync, cuda, --help and other commands start nothing; a local CPU build starts the server at once,
    # before typer (the commands) or torch (the server imports it) is imported here
    assert seen == [False, None, False, False, False, None, True, True, False, False]


def test_forked_workers_share_the_servers_objects_frozen_and_warm_up_in_the_background():
    """The server freezes what it imported (gc.freeze) before it forks: each worker's garbage collector
    skips those objects (a 150 ms full collection per worker at start, measured, before this). Each
    worker then imports its warm modules (the task code) itself, beside joining the cluster."""
    counts = python(
        "import gc, json\n"
        "if __name__ == '__main__':\n"
        "    from pipeline.startup import worker_modules\n"
        "    from cluster.forkserver import start_forkserver\n"
        "    assert start_forkserver(worker_modules('tiny'))\n"
        "    from cluster import open_cluster\n"
        "    import sys, time\n"
        "    with open_cluster('local', workers=2, threads_per_worker=1, device='cpu', timeout=60,\n"
        "                      preload_modules=worker_modules('tiny'), warm_modules=['wave', 'no_such_module']) as h:\n"
        "        frozen = h.client.run(gc.get_freeze_count)\n"
        "        has_torch = h.client.run(lambda: 'torch' in sys.modules)\n"
        "        for _ in range(100):\n"
        "            warm = h.client.run(lambda: 'wave' in sys.modules)\n"
        "            if all(warm.values()):\n"
        "                break\n"
        "            time.sleep(0.1)\n"
        "    print(json.dumps([[frozen[w], has_torch[w], warm[w], 'wave' in sys.modules] for w in sorted(frozen)]))\n")
    assert len(counts) == 2
    for frozen, has_torch, warm, here in counts:
        assert has_torch  # forked from the server, which imported torch
        assert frozen > 100_000, counts  # torch and distributed: hundreds of thousands of objects
        assert warm and not here  # each worker imported its warm module itself (a missing one is skipped)
