"""A newcomer's ordinary mistakes get one line each, never a traceback or a hang."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import zarr

from conftest import cli_env, run_cli


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("pagecube: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_out_that_is_a_file_is_refused_before_any_cluster(sample40, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    for extra in ([], ["--overwrite"]):
        proc = run_cli("build", sample40, "--out", afile, "--workers", "1", "--model", "tiny", *extra, check=2)
        assert "is an existing file" in _one_error_line(proc)
        assert len(proc.stderr.strip().splitlines()) == 1 and "dashboard" not in proc.stderr
    assert afile.read_text() == "mine"


def test_out_that_is_a_folder_of_other_files_is_refused_and_kept(sample40):
    """``--out my-pages`` by mistake: a new store empties its folder, so a folder of other files is refused."""
    pages = sample40.parent
    before = sorted(p.name for p in pages.iterdir())
    for extra in ([], ["--overwrite"]):
        proc = run_cli("build", sample40, "--out", pages, "--cluster", "sync", "--model", "tiny", *extra, check=2)
        assert "holds other files" in _one_error_line(proc)
    assert sorted(p.name for p in pages.iterdir()) == before and (pages / "manifests").is_dir()


def test_status_summary_diagnose_on_what_is_not_a_store(tmp_path):
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").attrs["x"] = 1  # a Zarr group, but not pagecube's
    for path in (tmp_path, tmp_path / "missing", plain):
        for cmd in ("status", "summary", "diagnose"):
            proc = run_cli(cmd, path, check=2)
            assert f"{path} is not a pagecube store" in _one_error_line(proc), proc.stderr
            assert "--repair" not in proc.stdout + proc.stderr and "No group found" not in proc.stderr


def test_unquoted_glob_says_to_quote_it(sample40):
    files = sorted((sample40.parent / "manifests").glob("*.json"))  # what the shell hands over
    proc = run_cli("build", *files, "--out", sample40.parent / "g.zarr", check=2)
    line = _one_error_line(proc)
    assert "quote" in line and f"{len(files)} paths" in line
    assert files[1].name not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_worker_errors_in_preflight_go_to_a_log_file_not_the_terminal(sample40, tmp_path):
    """A model that fails to load on the workers: Dask logs the failure there with a traceback."""
    proc = run_cli("build", sample40, "--out", tmp_path / "s.zarr", "--workers", "1",
                   "--model", "resident_factory:broken", "--preflight-timeout", 60, check=1)
    assert "could not be loaded" in _one_error_line(proc) and "corrupt (test)" in proc.stderr
    assert " - distributed." not in proc.stderr
    log = re.search(r"workers logged (\d+) errors? (?:and \d+ warnings? )?\(not shown here\): (\S+)", proc.stderr)
    assert log, proc.stderr
    with open(log.group(2)) as f:
        text = f.read()
    assert "corrupt (test)" in text and "Traceback" in text


def test_unguarded_script_gets_one_clear_error_not_a_hang(sample40, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import pipeline

        result = pipeline.build({str(sample40)!r}, {str(tmp_path / "cube.zarr")!r}, cluster="local", workers=2,
                                model="tiny", progress=False)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env=cli_env(), cwd=tmp_path)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.errors.BuildError:") and 'if __name__ == "__main__":' in last, proc.stderr
    assert proc.stderr.count("Traceback") == 1, proc.stderr  # the script's own, nothing from Dask or workers
    assert " - distributed." not in proc.stderr  # no Dask log lines
    assert not (tmp_path / "cube.zarr").exists()
