#!/usr/bin/env bash
# Create .venv and install aphq with every pinned dependency, idempotently.
#
# A stamp inside .venv records the sha256 of requirements.lock and
# pyproject.toml; when both are unchanged and the stack imports, this returns
# in about a second. No compiler and no CUDA toolkit are needed: mmcv-full is
# installed without its compiled ops, which aphq serves from torchvision
# (aphq_cli/mmcv_ext.py). Build and install output goes to .venv/bootstrap.log.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.aphq-bootstrap
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
check='import aphq_cli, mmcv.ops, mmdet'

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "$check" >/dev/null 2>&1; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
LOG=$root/$VENV/bootstrap.log
: > "$LOG"
step() { echo "aphq bootstrap: $1" >&2; echo "== $1" >> "$LOG"; }
fail() { echo "aphq bootstrap: $1 failed; the last lines of $LOG:" >&2; tail -n 20 "$LOG" >&2; exit 1; }
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >> "$LOG" 2>&1; }
pin() { grep -E "^$1(==|>=|<)" requirements.lock | head -n1; }

# torch 2.14.1's CUDA build and its libraries are most of the ~6 GB a .venv takes; without the room pip
# stops deep in its output ("No space left on device", as a CI machine once did), so say it first.
need_gb=7
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
  if [ "${free_kb:-0}" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "aphq bootstrap: $root has $((${free_kb:-0} / 1024 / 1024)) GB free and .venv needs about $need_gb GB" \
         "(torch's CUDA build and its libraries); free some space and run it again" >&2
    exit 1
  fi
fi

start=$SECONDS
step "installing build tools, torch and torchvision (first run only)"
pip install -q --upgrade pip || fail "upgrading pip"
pip install -q "$(pin setuptools)" "$(pin wheel)" || fail "installing setuptools"
pip install -q "$(pin torch)" "$(pin torchvision)" || fail "installing torch"

step "installing the pinned packages"
# Everything pinned except mmcv-full, built below.
grep -vE '^(#|$|torch|torchvision|mmcv-full|setuptools|wheel)' requirements.lock > "$VENV/requirements.txt"
pip install -q -c requirements.lock -r "$VENV/requirements.txt" || fail "installing the pinned packages"

# mmcv-full has no wheel on the registry. Its sdist built with MMCV_WITH_OPS=0 is a pure Python
# wheel (named mmcv) in seconds: no compiler, no CUDA toolkit, and the same wheel serves every
# machine. It is kept in a cache so later bootstraps (and CI) install it at once.
mmcv_v=$(pin mmcv-full | sed 's/.*==//')
if ! "$VENV/bin/python" -c "import mmcv, sys; sys.exit(mmcv.__version__ != '$mmcv_v')" >/dev/null 2>&1; then
  cache=${APHQ_WHEEL_CACHE:-$HOME/.cache/aphq/wheels}
  wheel=$(ls "$cache"/mmcv-"$mmcv_v"-py2.py3-none-any.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    step "building mmcv $mmcv_v without compiled ops (pure Python, seconds)"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv-full==$mmcv_v" \
      || fail "downloading the mmcv-full $mmcv_v sdist"
    tar -xzf "$work"/mmcv-full-"$mmcv_v".tar.gz -C "$work"
    (cd "$work/mmcv-full-$mmcv_v" && MMCV_WITH_OPS=0 "$root/$VENV/bin/python" -m pip wheel -q \
       --no-build-isolation --no-deps -w "$work/dist" . >> "$LOG" 2>&1) || fail "building mmcv"
    mkdir -p "$cache"
    cp "$work"/dist/mmcv-"$mmcv_v"-*.whl "$cache"/
    wheel=$(ls "$cache"/mmcv-"$mmcv_v"-py2.py3-none-any.whl | head -n1)
  fi
  # A .venv from an earlier aphq holds the compiled mmcv-full: the pure one replaces it.
  pip uninstall -q -y mmcv-full || true
  pip install -q --force-reinstall --no-deps "$wheel" || fail "installing $wheel"
fi

step "installing aphq (editable)"
pip install -q --no-build-isolation --no-deps -e . || fail "installing aphq"

"$VENV/bin/python" -c "$check" >> "$LOG" 2>&1 || fail "importing the installed stack"
echo "$want" > "$STAMP"
step "ready in $((SECONDS - start)) s ($VENV/bin/aphq)"
