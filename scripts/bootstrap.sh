#!/usr/bin/env bash
# Create .venv and install aphq with every pinned dependency, idempotently.
#
# A stamp inside .venv records the sha256 of requirements.lock and
# pyproject.toml; when both are unchanged and mmcv's compiled ops import,
# this returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv
STAMP=$VENV/.aphq-bootstrap
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$VENV/bin/python" -c 'import mmcv._ext' >/dev/null 2>&1; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

pin() { grep -E "^$1(==|>=|<)" requirements.lock | head -n1; }

echo "aphq bootstrap: installing build tools and torch (first run only)" >&2
pip install -q --upgrade pip >/dev/null
pip install -q "$(pin setuptools)" "$(pin wheel)"
pip install -q "$(pin torch)" "$(pin torchvision)"

# mmcv-full has no wheel on the registry: build it with its ops against the
# torch just installed. pip's wheel cache may hold a build for another torch,
# so a build whose ops fail to import is redone without the cache.
if ! "$VENV/bin/python" -c 'import mmcv._ext' >/dev/null 2>&1; then
  echo "aphq bootstrap: building mmcv-full with ops (about 13 minutes on 2 cores, once)" >&2
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation \
      -c requirements.lock "$(pin mmcv-full)"
  if ! "$VENV/bin/python" -c 'import mmcv._ext' >/dev/null 2>&1; then
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation \
        --no-cache-dir --force-reinstall --no-deps "$(pin mmcv-full)"
  fi
fi

# Everything else, exactly as pinned, then aphq itself in editable mode.
grep -vE '^(#|$|torch|torchvision|mmcv-full|setuptools|wheel)' requirements.lock \
  | pip install -q -c requirements.lock -r /dev/stdin
pip install -q --no-build-isolation --no-deps -e .

"$VENV/bin/python" -c 'import mmcv._ext, mmdet, aphq_cli' \
  || { echo "aphq bootstrap: the installed stack does not import" >&2; exit 1; }
echo "$want" > "$STAMP"
