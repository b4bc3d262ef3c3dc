"""The default model means something: its reading order matches the sample's true order.

A newcomer's first store is built with the default model; an untrained one
orders panels at random (measured: 1 of 98 pages right).  ``pretrained`` is
the default wherever it is installed, and ``tiny`` says it is untrained when
it stands in.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import xarray as xr

from conftest import ROOT, cli_env, run_cli
from pipeline.model.quality import measure, sample_pages
from pipeline.model.registry import PRETRAINED_PACKAGES, UNTRAINED_NOTICE, default_model, load_model


def test_default_model_reading_order_on_100_sample_pages(tmp_path):
    name = default_model()
    if name == "tiny":
        pytest.skip("pretrained is not installed here: the default is the untrained tiny model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        quality = measure(load_model(name, device="cpu"), sample_pages(tmp_path / "pages", 100, seed=0))
    finally:
        torch.set_num_threads(threads)
    assert quality.pages >= 90  # pages with two or more panels
    assert quality.order_accuracy >= 0.9, quality.line()


def test_build_without_model_takes_the_default_and_says_when_it_is_untrained(sample40, tmp_path):
    store = tmp_path / "d.zarr"
    proc = run_cli("build", sample40, "--out", store, "--cluster", "sync", "--init-only", check=0)
    assert xr.open_zarr(store).attrs["model"] == default_model()
    assert (UNTRAINED_NOTICE in proc.stderr) == (default_model() == "tiny")
    # without pretrained's packages (their import blocked), the build falls back to tiny and says so once
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in PRETRAINED_PACKAGES)
    code = f"import sys; {blocked}; from pipeline.cli import run; sys.argv[0] = 'pagecube'; run()"
    out = tmp_path / "t.zarr"
    proc = subprocess.run([sys.executable, "-c", code, "build", str(sample40), "--out", str(out), "--cluster", "sync",
                           "--init-only"], capture_output=True, text=True, timeout=120, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert xr.open_zarr(out).attrs["model"] == "tiny"
    assert proc.stderr.count(UNTRAINED_NOTICE) == 1
    # a store resumes with its own model when --model is not given, whatever the default is now
    proc = run_cli("build", sample40, "--out", out, "--cluster", "sync", "--no-progress", check=0)
    assert UNTRAINED_NOTICE not in proc.stderr and (xr.open_zarr(out)["status"].values == 1).all()
