#!/usr/bin/env bash
# One short prepared check for a GPU machine: pages/s and GPU busy, bf16, per model.
#
#   benchmarks/gpu_check.sh [--rehearse] [PAGES] [RUN...]
#       defaults: 4096 pages; runs tiny, closure-lite-base@1 and closure-lite-base
#       RUN is MODEL, MODEL@N (the build with --workers N: closure-lite-base@1 is one worker on
#       the GPU, against the default of several) or MODEL+overlap (PAGECUBE_OVERLAP_TASKS=1 on
#       the workers: a task writes its region while the next one reads)
#   GPU_CHECK_REHEARSE=1 is the same as --rehearse.
#   GPU_CHECK_SIZE=WxH sets the pages' size (default 1988x3056, a common size of real scans, drawn
#   like a scan by `pagecube sample --size`; 800x1200 gives the sample pages of earlier figures).
#
# Prepare it where PyPI is reachable (the GPU machine reaches no package index):
#   .venv/bin/python benchmarks/gpu_wheels.py      fills .whl/ with the wheels that machine lacks
# then run this one command there, from the repository root, with .whl carried along.
# Where python3 has no pagecube installed, the wheels in .whl/ are installed into a
# temporary folder put first on PYTHONPATH (nothing else is touched) and pagecube runs
# from there.  PYTHON=... picks another interpreter (default: .venv/bin/python, else python3).
#
# Makes a synthetic sample of 96 scan-size pages, cycled to PAGES lines, and builds it with
# --device cuda (the local cluster pins workers to the GPU; the models run under
# bf16 autocast there) while nvidia-smi samples utilization.gpu every 0.2 s.  For each
# model it prints first its two ceilings, measured apart (benchmarks/gpu_ceilings.py: the model
# alone on batches prepared beforehand; reading + preparing alone, on 1 and on all threads), then,
# beside the goals (closure-lite-base: >= 500 pages/s at >= 80% busy):
#   - pages/s in the steady state, from the first finished chunk to the last (start-up,
#     model load and the first chunk's warm-up left out), and over the whole run phase;
#   - GPU busy: the mean utilization.gpu over that same steady-state window, and the share
#     of samples above 0; peak GPU memory;
#   - the build's own task time by phase (model, waiting for pages, writing).
# Rehearsal (a machine without a GPU): everything but the GPU: --device cpu, one worker,
# 8 pages in chunks of 4, a stand-in sampler that answers "[N/A]" as nvidia-smi does
# where it cannot read a figure; the same report, GPU figures marked not measured.
set -euo pipefail
export LC_ALL=C  # "." in $EPOCHREALTIME

REHEARSE=${GPU_CHECK_REHEARSE:-0}
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
[ "$REHEARSE" = 0 ] || REHEARSE=1
if [ "$REHEARSE" = 1 ]; then PAGES=${1:-8}; CHUNK=4; DEVICE=cpu; EXTRA=(--workers 1)
else PAGES=${1:-4096}; CHUNK=256; DEVICE=cuda; EXTRA=(); fi
shift $(( $# > 0 ? 1 : 0 ))
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(tiny closure-lite-base@1 closure-lite-base)

PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
WORK=$(mktemp -d)
SMI_PID=
trap 'if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null || true; fi; rm -rf "$WORK"' EXIT
T0=$EPOCHREALTIME
say() { printf 'gpu_check: %s\n' "$*"; }
secs() { echo $(( ${EPOCHREALTIME%.*} - ${T0%.*} )); }

# --- pagecube: the one installed with $PY, else from the carried wheels
if "$PY" -c "import importlib.metadata as m; m.version('pagecube')" 2>/dev/null; then
    PC="$(dirname "$(command -v "$PY")")/pagecube"
    [ -x "$PC" ] || PC=pagecube
    say "pagecube as installed with $PY"
elif compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$WORK/site" .whl/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    PC="$WORK/site/bin/pagecube"
    say "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into a temporary --target folder"
else
    say "pagecube is not installed with $PY and there is no .whl/: run benchmarks/gpu_wheels.py first"; exit 2
fi

# --- pre-flight: versions, and every carried wheel's requirements met by what is there
"$PY" - "${WORK}/site" <<'EOF'
import platform, sys
from importlib import metadata
from packaging.requirements import Requirement
site = sys.argv[1]
def v(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"
names = ["torch", "numpy", "xarray", "dask", "distributed", "zarr", "transformers", "tokenizers", "pydantic"]
print(f"python {platform.python_version()}, glibc {platform.libc_ver()[1]}; " + ", ".join(f"{n} {v(n)}" for n in names))
bad = []
for dist in metadata.distributions(path=[site]):
    extras = {"", "base"} if dist.metadata["Name"] == "pagecube" else {""}
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        have = v(req.name)
        if have == "-" or not req.specifier.contains(have, prereleases=True):
            bad.append(f"{dist.metadata['Name']} needs {req.name}{req.specifier} and finds {have}")
if bad:
    sys.exit("gpu_check: unmet requirements:\n  " + "\n  ".join(bad))
EOF

if [ "$REHEARSE" = 1 ]; then
    say "rehearsal: --device cpu, no GPU figures"
    smi() { while echo "[N/A], [N/A]"; do sleep 0.2; done; }
else
    command -v nvidia-smi >/dev/null || { say "nvidia-smi not found: not a GPU machine (try --rehearse)"; exit 2; }
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA here'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
    smi() { nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200; }
fi
stamp() { while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done; }

# --- a sample of 96 distinct pages, cycled to PAGES lines (decode cost is real, files are cached;
#     drawing a scan-size page takes about 0.4 s on one core, so few are drawn)
SIZE=${GPU_CHECK_SIZE:-1988x3056}
"$PC" sample "$WORK/sample" --pages 96 --size "$SIZE" >/dev/null
"$PY" - "$WORK/sample/pages.txt" "$WORK/pages.txt" "$PAGES" <<'EOF'
import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = os.path.dirname(src)
lines = [ln.strip() for ln in open(src) if ln.strip()]
with open(dst, "w") as f:
    for i in range(n):
        f.write(os.path.join(base, lines[i % len(lines)]) + "\n")
EOF
say "sample ready ($PAGES pages of $SIZE) after $(secs) s"

REPORT="$WORK/report.txt"
: > "$REPORT"
# --- the two ceilings, apart: the model alone, and reading + preparing alone (gpu_ceilings.py)
CEIL_SECONDS=3; CEIL_BATCH=64
if [ "$REHEARSE" = 1 ]; then CEIL_SECONDS=0.5; CEIL_BATCH=2; fi
declare -A SEEN=()
for RUN in "${MODELS[@]}"; do
    MODEL=${RUN%+overlap}; MODEL=${MODEL%@*}
    [ -z "${SEEN[$MODEL]:-}" ] || continue
    SEEN[$MODEL]=1
    "$PY" benchmarks/gpu_ceilings.py "$WORK/pages.txt" "$MODEL" --device "$DEVICE" --batch-size "$CEIL_BATCH" \
        --seconds "$CEIL_SECONDS" >> "$REPORT" 2>"$WORK/ceil-$MODEL.err" \
        || { say "ceilings of $MODEL failed:"; tail -n 5 "$WORK/ceil-$MODEL.err"; }
done
FAILED=0
for RUN in "${MODELS[@]}"; do
    MODEL=${RUN%+overlap}
    OVERLAP=0; [ "$MODEL" = "$RUN" ] || OVERLAP=1
    WORKERS=("${EXTRA[@]}")
    if [ "${MODEL%@*}" != "$MODEL" ]; then WORKERS=(--workers "${MODEL##*@}"); MODEL=${MODEL%@*}; fi
    D="$WORK/$RUN"
    mkdir -p "$D"
    smi | stamp > "$D/smi.txt" &
    SMI_PID=$!
    START=$EPOCHREALTIME
    RC=0
    PAGECUBE_OVERLAP_TASKS=$OVERLAP "$PC" build "$WORK/pages.txt" --out "$D/cube.zarr" --device "$DEVICE" --model "$MODEL" \
        --batch-size 64 --chunk-pages "$CHUNK" "${WORKERS[@]}" > "$D/out.txt" 2> >(stamp > "$D/err.txt") || RC=$?
    END=$EPOCHREALTIME
    kill "$SMI_PID" 2>/dev/null || true
    wait "$SMI_PID" 2>/dev/null || true
    SMI_PID=
    sleep 0.5  # the stderr time-stamper writes its last lines
    [ "$RC" = 0 ] || FAILED=1
    if [ "$RC" != 0 ] && [ "$RC" != 3 ]; then  # (3: some pages failed; the figures still stand)
        say "model $RUN: build exited $RC; its last lines:"
        tail -n 8 "$D/out.txt" "$D/err.txt"
        echo "model $RUN: build failed (exit $RC), no figures" >> "$REPORT"
        continue
    fi
    "$PY" - "$D" "$START" "$END" "$PAGES" "$RUN" "$REHEARSE" "${WORKERS[*]}" >> "$REPORT" <<'EOF'
import re, sys
d, start, end, pages, model, rehearse, workers = sys.argv[1:]
start, end, pages, rehearse = float(start), float(end), int(pages), rehearse == "1"
goals = {"closure-lite-base": (500.0, 80.0)}  # pages/s, mean utilization.gpu %
# chunk completions: "<time> pages N/M (done ..." lines of the build's progress
marks = [(float(t), int(n)) for t, n in re.findall(r"^(\S+) pages (\d+)/\d+", open(f"{d}/err.txt").read(), re.M)]
steady = None
if len(marks) >= 2 and marks[-1][0] > marks[0][0]:
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    steady = (n1 - n0) / (t1 - t0)
else:
    t0, t1 = start, end
out = open(f"{d}/out.txt").read()
m = re.search(r"\(([\d.]+) pages/s over this run", out)
run_rate = float(m.group(1)) if m else None
m = re.search(r"(\d+) done, (\d+) failed", out)
counts = f"{m.group(1)} done, {m.group(2)} failed" if m else "no summary line"
util, mem = [], []
for line in open(f"{d}/smi.txt"):
    parts = line.replace(",", " ").split()
    if len(parts) >= 3 and t0 <= float(parts[0]) <= t1 and parts[1].isdigit():
        util.append(int(parts[1]))
        if parts[2].isdigit():
            mem.append(int(parts[2]))
goal_rate, goal_busy = goals.get(re.split(r"[+@]", model)[0], (None, None))

def verdict(value, goal):
    if goal is None:
        return "(no goal)"
    if value is None or rehearse:
        return f"(goal >= {goal:g})  not judged"
    return f"(goal >= {goal:g})  {'MET' if value >= goal else 'NOT MET'}"

def num(value, fmt):
    return "not measured" if value is None else format(value, fmt)

busy = sum(util) / len(util) if util else None
placed = f"{workers.split()[-1]} worker(s)" if workers else "the default workers per GPU"
where = f"CPU rehearsal, {placed}" if rehearse else f"bf16 autocast, {placed}"
print(f"model {model}, {pages} pages ({counts}), {where}; whole command {end - start:.1f} s")
print(f"  pages/s, first chunk to last       {num(steady, '8.1f'):>12}   {verdict(steady, goal_rate)}")
print(f"  pages/s, whole run phase           {num(run_rate, '8.1f'):>12}")
print(f"  GPU busy, mean utilization.gpu %   {num(busy, '8.1f'):>12}   {verdict(busy, goal_busy)}")
share = sum(v > 0 for v in util) / len(util) if util else None
print(f"  share of samples with util > 0     {num(share, '8.2f'):>12}   ({len(util)} samples at 0.2 s)")
print(f"  peak GPU memory used, MiB          {num(max(mem) if mem else None, '8.0f'):>12}")
m = re.search(r"task time by phase, summed over tasks: (.*)", out)
print(f"  task time: {m.group(1) if m else 'not printed'}")
EOF
done
cat "$REPORT"
say "done in $(secs) s"
exit "$FAILED"
