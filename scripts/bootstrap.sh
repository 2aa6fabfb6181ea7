#!/usr/bin/env bash
# Create .venv and install aphq with every pinned dependency, idempotently.
#
# A stamp inside .venv records the sha256 of requirements.lock and
# pyproject.toml; when both are unchanged and mmcv's compiled ops import,
# this returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

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

# Everything pinned except mmcv-full (its runtime needs come first, so that
# its import check below tests the compiled ops, not a missing package).
grep -vE '^(#|$|torch|torchvision|mmcv-full|setuptools|wheel)' requirements.lock \
  | pip install -q -c requirements.lock -r /dev/stdin

# mmcv-full has no wheel on the registry, and its setup.py forces -std=c++17
# while torch 2.14's headers need C++20: build its sdist with that one flag
# changed, against the torch just installed, and keep the wheel in a cache
# keyed by the torch version so later bootstraps (and CI) install in seconds.
if ! "$VENV/bin/python" -c 'import mmcv._ext' >/dev/null 2>&1; then
  torch_v=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
  mmcv_v=$(pin mmcv-full | sed 's/.*==//')
  cache=${APHQ_WHEEL_CACHE:-$HOME/.cache/aphq/wheels}/torch-$torch_v
  wheel=$(ls "$cache"/mmcv_full-"$mmcv_v"-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    echo "aphq bootstrap: building mmcv-full $mmcv_v with ops for torch $torch_v (about 15-20 minutes on 2 cores, once)" >&2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv-full==$mmcv_v"
    tar -xzf "$work"/mmcv-full-"$mmcv_v".tar.gz -C "$work"
    sed -i "s/'-std=c++17'\]/'-std=c++20']/" "$work/mmcv-full-$mmcv_v/setup.py"
    grep -q "std=c++20" "$work/mmcv-full-$mmcv_v/setup.py" \
      || { echo "aphq bootstrap: mmcv-full's setup.py changed; cannot set C++20" >&2; exit 1; }
    mkdir -p "$cache"
    (cd "$work/mmcv-full-$mmcv_v" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
      "$root/$VENV/bin/python" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .)
    cp "$work"/dist/mmcv_full-*.whl "$cache"/
    wheel=$(ls "$cache"/mmcv_full-"$mmcv_v"-*.whl | head -n1)
  fi
  pip install -q --force-reinstall --no-deps "$wheel"
  "$VENV/bin/python" -c 'import mmcv._ext' \
    || { echo "aphq bootstrap: $wheel does not import; delete it and rerun" >&2; exit 1; }
fi

# aphq itself, editable, so the checkout is what runs.
pip install -q --no-build-isolation --no-deps -e .

"$VENV/bin/python" -c 'import mmcv._ext, mmdet, aphq_cli' \
  || { echo "aphq bootstrap: the installed stack does not import" >&2; exit 1; }
echo "$want" > "$STAMP"
