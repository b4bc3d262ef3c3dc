"""Every code block of README.md and docs/*.md runs, as a newcomer pastes them: each file top to
bottom, in its own scratch folder.

``bash`` blocks run with ``bash -e`` (the project's ``pagecube`` and ``python``
first on ``PATH``), ``python`` blocks as scripts (so a missing
``if __name__ == "__main__":`` guard shows).  Other languages are not run.  A
block that cannot run here (a real cluster, S3, another machine) is marked on
the line right before its opening fence, with the reason::

    <!-- readme-test: skip, needs a SLURM cluster -->
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env

SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b[,:\s]*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, skip reason or None) for each fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[i - 1].strip() if i else ""
        skip = SKIP.fullmatch(before)
        blocks.append((i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                       (skip.group(1) or "no reason given") if skip else None))
        i = end + 1
    return blocks


def test_skip_marker_is_read_only_right_before_a_fence():
    text = "a\n<!-- readme-test: skip, needs S3 -->\n```bash\nfalse\n```\n\n```python\nx = 1\n```\n"
    assert [(lang, why) for _, lang, _, why in readme_blocks(text)] == [("bash", "needs S3"), ("python", None)]


DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


def test_the_docs_folder_is_found():
    assert {"docs/store.md", "docs/operations.md", "docs/benchmarks.md"} <= set(DOCS)


def run_blocks(doc: str, tmp_path: Path) -> list[tuple[int, str, str, str | None]]:
    """Run doc's bash and python blocks in order in tmp_path; return the blocks that ran."""
    blocks = readme_blocks((ROOT / doc).read_text())
    for line, lang, _, why in blocks:
        if why is not None:
            assert why.strip() and why != "no reason given", f"{doc} line {line}: say why the block is skipped"
    run = [b for b in blocks if b[1] in ("bash", "python") and b[3] is None]
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the docs' paths are from the repository root
    env = cli_env({"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
    for line, lang, code, _ in run:
        script = tmp_path / f"{Path(doc).stem}_line_{line}.{'sh' if lang == 'bash' else 'py'}"
        script.write_text(code)
        cmd = ["bash", "-e", str(script)] if lang == "bash" else [sys.executable, str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, (f"{doc} block at line {line} ({lang}) failed, exit {proc.returncode}:\n"
                                      f"{code}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}")
        assert "Traceback" not in proc.stderr, f"{doc} block at line {line}:\n{proc.stderr[-3000:]}"
    return run


def test_every_readme_block_runs(tmp_path):
    run = run_blocks("README.md", tmp_path)
    assert any(b[1] == "bash" for b in run) and any(b[1] == "python" for b in run)


@pytest.mark.parametrize("doc", [d for d in DOCS if d != "README.md"])
def test_every_docs_block_runs(doc, tmp_path):
    run_blocks(doc, tmp_path)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchor_rule_matches_github():
    assert github_anchor("The writer lock (a lease)") == "the-writer-lock-a-lease"
    assert github_anchor("Object storage (S3 and other fsspec URLs)") == "object-storage-s3-and-other-fsspec-urls"


LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS)
def test_links_between_the_docs_resolve(doc):
    """A relative link names a file that exists and, after #, one of its headings."""
    checked = 0
    for target in LINK.findall((ROOT / doc).read_text()):
        if "://" in target:
            continue
        path, _, anchor = target.partition("#")
        dest = ((ROOT / doc).parent / path).resolve() if path else ROOT / doc
        assert dest.exists(), f"{doc}: link to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{doc}: link to {target}: no such heading"
        checked += 1
    if doc == "README.md":
        assert checked >= 4, "the README links to the docs"


if __name__ == "__main__":  # list the blocks and what the test does with each
    for doc in DOCS:
        for line, lang, code, why in readme_blocks((ROOT / doc).read_text()):
            print(f"{doc:20s} line {line:4d} {lang or '-':7s} "
                  f"{'skip: ' + why if why else 'run' if lang in ('bash', 'python') else '-'}")
    sys.exit(pytest.main([__file__, "-q"]) if "--run" in sys.argv else 0)
