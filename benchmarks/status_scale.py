"""`pagecube status` on a synthetic 10^7-page store with 90% of its chunks done.

The store is the template plus finished-chunk index entries written directly
(one chunk in 1,000 with a failed page); ``status`` is then timed as a user
runs it (a fresh ``pagecube status STORE`` process: start-up, imports,
answer) and in-process (``pipeline.store_status``).  Goal: < 5 s.
The status code itself belongs to pipeline/readers.py; this only measures it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from common import Workdir, figure, header, note, parser, quiet_logs, synthetic_store

N_BIG = 10_000_000


def main(argv=None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--store", default=None, help="an existing synthetic store to reuse")
    args = p.parse_args(argv)
    quiet_logs()
    js = args.json
    header("status on a 10^7-page store, 90% of chunks done")
    with Workdir(args.workdir) as wd:
        store = wd.path / "synthetic-1e7.zarr"
        if args.store:
            store = args.store
        elif not (store / "_pagecube" / "chunks").exists():
            made = synthetic_store(wd.fresh("synthetic-1e7.zarr"), N_BIG, done_fraction=0.9)
            note(f"made the synthetic store: {made['n_done']} of {made['n_chunks']} chunks done")
        exe = shutil.which("pagecube", path=os.path.dirname(sys.executable)) or "pagecube"
        t = time.perf_counter()
        proc = subprocess.run([exe, "status", str(store)], capture_output=True, text=True)
        cli_s = time.perf_counter() - t
        first = (proc.stdout.strip().splitlines() or ["?"])
        note(f"`pagecube status` exit {proc.returncode}: {' | '.join(ln.strip() for ln in first[:2])}")
        figure("`pagecube status` (fresh process), 10^7 pages", cli_s, goal="< 5", unit="s", ok=cli_s < 5,
               json_path=js, fmt="{:.2f}")
        from pipeline import store_status

        t = time.perf_counter()
        st = store_status(str(store))
        api_s = time.perf_counter() - t
        figure("store_status() in process, 10^7 pages", api_s, goal="< 5", unit="s", ok=api_s < 5,
               json_path=js, fmt="{:.2f}")
        note(f"status says done {st.done}, failed {st.failed}, pending {st.pending}")


if __name__ == "__main__":
    main()
