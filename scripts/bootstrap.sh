#!/usr/bin/env bash
# Make a checkout ready to run and test: system packages, .venv, the package installed
# editable with its dev extras. Fast when nothing changed (a few ms), so `make test` can
# call it every time.
#
#   scripts/bootstrap.sh
#
# Environment:
#   PYTHON                    interpreter to create .venv with (default: newest python3.1x found)
#   DISPATCH_SKIP_SYSTEM_DEPS=1  skip scripts/ensure-system-deps.sh (e.g. inside an image)
#
# The package is (re)installed when pyproject.toml is newer than .venv/.bootstrap-stamp;
# delete the stamp (or .venv) to force it.
set -euo pipefail

me="bootstrap"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

venv="$root/.venv"
stamp="$venv/.bootstrap-stamp"

if [[ "${DISPATCH_SKIP_SYSTEM_DEPS:-0}" != "1" ]]; then
  "$root/scripts/ensure-system-deps.sh"
fi

# true when "$1" runs and is Python 3.11 or newer
python_ok() {
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

find_python() {
  local candidate
  if [[ -n "${PYTHON:-}" ]]; then
    if python_ok "$PYTHON"; then
      echo "$PYTHON"
      return 0
    fi
    echo "$me: PYTHON=$PYTHON is not a working Python 3.11 or newer" >&2
    return 1
  fi
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  echo "$me: this project needs Python 3.11 or newer; found: $(python3 --version 2>&1 || echo 'no python3')" >&2
  echo "$me: install one (e.g. apt-get install python3.11 python3.11-venv) or set PYTHON=/path/to/python3.11" >&2
  return 1
}

if [[ -x "$venv/bin/python" ]]; then
  if ! python_ok "$venv/bin/python"; then
    echo "$me: $venv uses $("$venv/bin/python" --version 2>&1); this project needs Python 3.11+." >&2
    echo "$me: remove it (rm -rf .venv) and run this again" >&2
    exit 1
  fi
else
  python=$(find_python)
  echo "$me: creating .venv with $("$python" --version 2>&1)" >&2
  if ! "$python" -m venv "$venv"; then
    echo "$me: '$python -m venv' failed; on Debian install python3-venv (or python3.X-venv)" >&2
    exit 1
  fi
  rm -f "$stamp"
fi

if [[ ! -f "$stamp" || "$root/pyproject.toml" -nt "$stamp" ]]; then
  echo "$me: installing the package and its dev tools into .venv" >&2
  log="$venv/.bootstrap-pip.log"
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-input -e '.[dev]' >"$log" 2>&1; then
    echo "$me: pip install failed; last lines of $log:" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
  touch "$stamp"
fi
