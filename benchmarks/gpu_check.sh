#!/usr/bin/env bash
# One short prepared check for a GPU machine: pages/s and GPU busy fraction.
#
#   benchmarks/gpu_check.sh [PAGES] [MODEL]      (defaults: 2048 pages, closure-lite-base)
#
# Makes a synthetic sample of 12-panel-heavy pages, builds it with --device cuda
# (one worker per GPU, bf16 autocast inside the model), samples nvidia-smi
# utilization.gpu every 0.2 s during the build, and prints pages/s and the
# busy fraction (share of samples with utilization > 0) next to the goals
# (>= 500 pages/s, busy >= 80%).  Runs from the repository root; needs the
# project installed (python -m pip install -e .) with a CUDA build of torch.
set -euo pipefail
PAGES=${1:-2048}
MODEL=${2:-closure-lite-base}
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
PC="$(dirname "$(command -v "$PY")")/pagecube"
[ -x "$PC" ] || PC=pagecube
WORK=$(mktemp -d)
trap 'kill ${SMI_PID:-0} 2>/dev/null || true; rm -rf "$WORK"' EXIT

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: not a GPU machine"; exit 2; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA here'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"

# a sample of 256 distinct pages, cycled to PAGES lines (decode cost is real, files are cached)
"$PC" sample "$WORK/sample" --pages 256 >/dev/null
"$PY" - "$WORK/sample/pages.txt" "$WORK/pages.txt" "$PAGES" <<'EOF'
import os, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = os.path.dirname(src)
lines = [ln.strip() for ln in open(src) if ln.strip()]
with open(dst, "w") as f:
    for i in range(n):
        f.write(os.path.join(base, lines[i % len(lines)]) + "\n")
EOF

# warm-up build (model load, CUDA init, cuDNN autotune) on a few pages, not timed
head -n 64 "$WORK/pages.txt" > "$WORK/warm.txt"
"$PC" build "$WORK/warm.txt" --out "$WORK/warm.zarr" --device cuda --model "$MODEL" \
    --batch-size 64 >/dev/null 2>&1 || true

nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 > "$WORK/smi.txt" &
SMI_PID=$!
START=$(date +%s.%N)
"$PC" build "$WORK/pages.txt" --out "$WORK/cube.zarr" --device cuda --model "$MODEL" \
    --batch-size 64 --chunk-pages 256 2> "$WORK/build.log" || { tail -5 "$WORK/build.log"; exit 1; }
END=$(date +%s.%N)
kill $SMI_PID 2>/dev/null || true
tail -2 "$WORK/build.log"
"$PY" - "$WORK/smi.txt" "$WORK/build.log" "$START" "$END" "$PAGES" "$MODEL" <<'EOF'
import re, sys
smi, log, start, end, pages, model = sys.argv[1:]
vals = [int(v) for v in open(smi).read().split() if v.strip().isdigit()]
# the first and last seconds are start-up and finalisation: keep the middle 90% of samples
k = len(vals) // 20
mid = vals[k:len(vals) - k] or vals
busy = sum(v > 0 for v in mid) / max(1, len(mid))
mean = sum(mid) / max(1, len(mid))
m = re.findall(r"\(([\d.]+) pages/s this run\)", open(log).read())
rate = float(m[-1]) if m else int(pages) / (float(end) - float(start))
print(f"model {model}, {pages} pages, bf16 autocast")
print(f"  pages/s (run phase)              {rate:8.1f}   (goal >= 500)  {'MET' if rate >= 500 else 'NOT MET'}")
print(f"  GPU busy fraction (util > 0)     {busy:8.2f}   (goal >= 0.80) {'MET' if busy >= 0.8 else 'NOT MET'}")
print(f"  mean utilization.gpu             {mean:8.1f} %  ({len(mid)} samples at 0.2 s)")
EOF
