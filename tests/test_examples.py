"""Every example runs as it stands (on a small sample), and the cluster specs build offline."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(args, cwd, timeout=180):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def test_build_from_python_then_embedding_map(tmp_path):
    out = _run([EXAMPLES / "build_from_python.py", "--out", tmp_path / "ex", "--pages", "16", "--workers", "2"],
               cwd=tmp_path)
    assert "build: 16 done, 0 failed of 16" in out
    assert "page_embeddings (16, " in out and "panel #0: attention" in out

    png = tmp_path / "map.png"
    out = _run([EXAMPLES / "embedding_map.py", tmp_path / "ex" / "cube.zarr", "-o", png], cwd=tmp_path)
    assert "16 of 16 pages" in out
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (600, 800, 3)
    # the points are drawn, not only axes and text
    def near(rgb):  # tab10 colours drawn at alpha 0.8 on white
        want = 0.8 * np.array(rgb) + 0.2 * 255
        return int((np.abs(img.astype(float) - want).sum(axis=2) < 30).sum())

    import pipeline

    n_series = len(set(pipeline.open_pages(str(tmp_path / "ex" / "cube.zarr"))["series"].values.tolist()))
    tab10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for k in range(min(n_series, 4)):  # each series' points drawn in its own colour
        assert near(tab10[k]) > 20, (k, n_series)


def test_embedding_map_mid_run_uses_finished_pages_only(tmp_path):
    """A store with done, failed and pending pages: the map draws the done pages and nothing else."""
    import warnings

    import zarr

    import pipeline
    from pipeline.sample import make_sample

    listing = make_sample(tmp_path / "pages", 12, seed=2)
    lines = listing.read_text().splitlines(keepends=True)
    first8 = listing.parent / "first8.txt"
    first8.write_text("".join(lines[:8]))
    (listing.parent / "images" / "page_00005.jpg").unlink()  # page 5 fails: its image is missing
    store = tmp_path / "cube.zarr"
    empty = tmp_path / "m0.png"
    pipeline.build(str(first8), str(store), cluster="sync", chunk_pages=4, init_only=True, model="tiny",
                   progress=False)
    out = _run([EXAMPLES / "embedding_map.py", store, "-o", empty], cwd=tmp_path)
    assert "0 of 8 pages" in out and Image.open(empty).size == (800, 600)

    pipeline.build(str(first8), str(store), cluster="sync", chunk_pages=4, model="tiny", progress=False)
    pipeline.build(str(listing), str(store), cluster="sync", init_only=True, model="tiny",
                   progress=False)  # grown: 8..11 pending
    # Pages 8..11 as a chunk looks between its data write and its status write (a build in the middle of
    # a chunk, or killed there): finite embeddings and a series of their own, status still 0.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = zarr.open_group(str(store), mode="r+", use_consolidated=False)
        emb = g["page_embeddings"][:8]
        g["page_embeddings"][8:12] = 3 * emb[[0, 1, 2, 3]] + 1
        g["series"][8:12] = np.array(["zz mid-write"] * 4, dtype=np.dtypes.StringDType())
    status = pipeline.open_store(str(store))["status"].values
    assert status.tolist() == [1] * 5 + [2] + [1] * 2 + [0] * 4
    assert np.isfinite(emb[status[:8] == 1]).all() and not np.isfinite(emb[5]).any()

    png = tmp_path / "m1.png"
    out = _run([EXAMPLES / "embedding_map.py", store, "-o", png], cwd=tmp_path)
    assert "wrote" in out and "7 of 12 pages" in out, out  # the 7 done pages, not the failed or pending ones
    img = np.asarray(Image.open(png).convert("RGB")).astype(float)

    def near(rgb):  # tab10 colours drawn at alpha 0.8 on white (legend markers: unblended)
        return sum(int((np.abs(img - np.array(c)).sum(axis=2) < 30).sum()) for c in (rgb, 0.8 * np.array(rgb) + 51))

    done_series = set(pipeline.open_pages(str(store))["series"].values.tolist())
    assert len(done_series) == 1 and "zz mid-write" not in done_series  # the sample's first issue: one series
    blue, orange = (31, 119, 180), (255, 127, 14)  # tab10[0]: the done pages' series; tab10[1]: a second one
    assert near(blue) > 20
    assert near(orange) == 0, "a page that is not done was drawn (its series got the second colour)"


LOOK = re.compile(r"^t=\s*[\d.]+s\s+done\s+(\d+)\s+failed\s+(\d+)\s+pending\s+(\d+)\s+of (\d+)$")


def _looks(out: str) -> list[tuple[int, int, int, int]]:
    """The (done, failed, pending, total) of each look that watch_partial.py printed."""
    return [tuple(map(int, m.groups())) for m in map(LOOK.match, out.splitlines()) if m]


def test_watch_partial_sees_a_build_in_progress(tmp_path):
    """A build held in the middle (12 of 24 pages done, the rest waiting on a gate): the watcher
    reports the partial state, then follows the build to its end."""
    from faultkit import MODEL, make_pages, popen_build, run, wait_for

    pages = make_pages(tmp_path / "s", 24, seed=5)
    first = pages.parent / "first12.txt"
    first.write_text("".join(pages.read_text().splitlines(keepends=True)[:12]))
    store = tmp_path / "cube.zarr"
    args = ["--cluster", "sync", "--model", MODEL, "--chunk-pages", "4", "--batch-size", "4"]
    code, _, err = run("build", first, "--out", store, *args, "--no-progress")
    assert code == 0, err
    gate = tmp_path / "gate"
    build = popen_build(pages, store, *args, extra_env={"FAULTKIT_GATE": str(gate)})  # grows to 24, then holds
    watcher = None
    try:
        def grown():
            try:
                return xr.open_zarr(store, consolidated=True).sizes["page"] == 24
            except Exception:
                return False

        wait_for(grown, 120, "the build to grow the store to 24 pages", build)
        watcher = subprocess.Popen([sys.executable, "-u", EXAMPLES / "watch_partial.py", store, "--interval", "0.1",
                                    "--timeout", "120"], cwd=tmp_path, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        seen = watcher.stdout.readline()  # its first look, taken while the build is held
        assert _looks(seen) == [(12, 0, 12, 24)], seen
        gate.write_text("")
        _, berr = build.communicate(timeout=120)
        assert build.returncode == 0, berr[-2000:]
        rest, werr = watcher.communicate(timeout=120)
    finally:
        for proc in (build, watcher):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert watcher.returncode == 0, werr[-2000:]
    out = seen + rest
    looks = _looks(out)
    assert looks[-1] == (24, 0, 0, 24), out
    assert all(d + f + p == n for d, f, p, n in looks), out
    assert [d for d, *_ in looks] == sorted(d for d, *_ in looks), out  # done never goes back
    assert "finished: 24 done, 0 failed, 0 pending; saw partial results: True" in out, out


def test_watch_partial_demo_builds_and_watches(tmp_path):
    """``--demo`` as documented: makes a sample, starts a build and watches it to the end.  Whether a
    look falls between two chunks depends on the machine's speed; the test above holds a build
    to check that a partial state is seen."""
    out = _run([EXAMPLES / "watch_partial.py", "--demo", tmp_path / "w", "--pages", "24", "--interval", "0.2"],
               cwd=tmp_path)
    looks = _looks(out)
    assert looks and looks[-1] == (24, 0, 0, 24), out
    assert all(d + f + p == n == 24 for d, f, p, n in looks), out
    assert "finished: 24 done, 0 failed, 0 pending; saw partial results: " in out, out


def test_cluster_specs_build_offline():
    from cluster.specs import kubernetes_cluster_spec, load_spec, slurm_job_script

    slurm = load_spec(EXAMPLES / "slurm.yaml")
    script = slurm_job_script(slurm)
    assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
    assert "MALLOC_TRIM_THRESHOLD_" in script

    resource = kubernetes_cluster_spec(load_spec(EXAMPLES / "kubernetes.yaml"))
    worker = resource["spec"]["worker"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    scheduler = resource["spec"]["scheduler"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in str(scheduler.get("resources"))


def test_remote_walkthrough_names_real_options():
    text = (EXAMPLES / "remote_cluster.md").read_text()
    for needle in ("dask scheduler --host 127.0.0.1", "--dashboard-address 127.0.0.1:", "dask worker",
                   "MALLOC_TRIM_THRESHOLD_", "pagecube build", "--cluster tcp://"):
        assert needle in text
    from typer.main import get_command

    from pipeline.cli.commands import app

    build = get_command(app).commands["build"]
    options = {o for p in build.params for o in getattr(p, "opts", [])}
    for opt in ("--out", "--cluster"):
        assert opt in options
