#!/usr/bin/env bash
# Install the Debian packages this project needs on the machine, when they are missing.
#
# Idempotent and quiet when everything is present. When something is missing it runs
# `apt-get update` once and installs only the missing packages, non-interactively.
# Not root and something missing: prints what to install and exits 1.
#
#   scripts/ensure-system-deps.sh           # check and install
#   scripts/ensure-system-deps.sh --check   # check only: exit 1 (and say what) if missing
#
# To add a dependency, add one line to REQUIREMENTS below:
#   "<debian package>|<kind>|<what to look for>"
# kinds:
#   bin   a command on PATH (or in /usr/sbin, /sbin)
#   glob  a file matching a shell glob, e.g. /usr/lib/postgresql/*/bin/initdb
#   lib   a shared library known to the dynamic linker (ldconfig -p), e.g. libspandsp.so.2
set -euo pipefail

REQUIREMENTS=(
  "redis-server|bin|redis-server"
  "postgresql|glob|/usr/lib/postgresql/*/bin/initdb"
  "libspandsp2|lib|libspandsp.so.2"
  # fax documents: WeasyPrint's text layout, and a font that covers Cyrillic
  "libpango-1.0-0|lib|libpango-1.0.so.0"
  "libpangoft2-1.0-0|lib|libpangoft2-1.0.so.0"
  "libharfbuzz-subset0|lib|libharfbuzz-subset.so.0"
  "fonts-dejavu-core|glob|/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
  # the IMAP bounce poller's tests run a private dovecot (dovecot-core comes with it)
  "dovecot-imapd|bin|dovecot"
  "dovecot-imapd|glob|/usr/lib/dovecot/imap-login"
  # the embeddable counters' browser test drives Debian's Chromium through Playwright
  # (Playwright's own browser download needs the internet)
  "chromium|bin|chromium"
  # docs/intake.md's sign-and-post examples are run by the real interpreters (tests/test_intake_docs.py)
  "php-cli|bin|php"
  "php-curl|glob|/etc/php/*/mods-available/curl.ini"
  "nodejs|bin|node"
)

me="ensure-system-deps"
check_only=0
case "${1:-}" in
  "") ;;
  --check) check_only=1 ;;
  -h | --help)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "$me: unknown argument: $1 (try --help)" >&2
    exit 2
    ;;
esac

have_bin() {
  command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/sbin/$1" ]]
}

have_glob() {
  local pattern=$1 match
  for match in $pattern; do
    [[ -e "$match" ]] && return 0
  done
  return 1
}

ldconfig_cache=""
have_lib() {
  if [[ -z "$ldconfig_cache" ]]; then
    local ldconfig
    ldconfig=$(command -v ldconfig || echo /sbin/ldconfig)
    # read it whole first: `ldconfig -p | grep -q` can die of SIGPIPE under pipefail
    ldconfig_cache=$("$ldconfig" -p 2>/dev/null || true)
  fi
  grep -qF -- "$1 " <<<"$ldconfig_cache"
}

is_present() {
  local kind=$1 what=$2
  case "$kind" in
    bin) have_bin "$what" ;;
    glob) have_glob "$what" ;;
    lib) have_lib "$what" ;;
    *)
      echo "$me: unknown check kind '$kind' for '$what'" >&2
      exit 2
      ;;
  esac
}

# sets the global array `missing` to the packages whose check fails
collect_missing() {
  local entry package kind what
  missing=()
  for entry in "${REQUIREMENTS[@]}"; do
    IFS='|' read -r package kind what <<<"$entry"
    if ! is_present "$kind" "$what"; then
      missing+=("$package")
    fi
  done
}

collect_missing
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

if [[ $check_only -eq 1 ]]; then
  echo "$me: missing Debian packages: ${missing[*]}" >&2
  exit 1
fi

if [[ $(id -u) -ne 0 ]]; then
  {
    echo "$me: missing Debian packages: ${missing[*]}"
    echo "$me: install them as root, then run this again:"
    echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
  } >&2
  exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "$me: missing packages (${missing[*]}) and no apt-get here: install them by hand" >&2
  exit 1
fi

echo "$me: installing missing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -o Dpkg::Use-Pty=0 -o DPkg::Lock::Timeout=300)
log=$(mktemp "${TMPDIR:-/tmp}/ensure-system-deps.XXXXXX")
trap 'rm -f "$log"' EXIT

run_logged() {
  if ! "$@" >"$log" 2>&1; then
    echo "$me: failed: $*" >&2
    tail -n 30 "$log" >&2
    exit 1
  fi
}

run_logged apt-get "${apt_opts[@]}" update
run_logged apt-get "${apt_opts[@]}" install -y --no-install-recommends \
  -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}"

installed=("${missing[@]}")
ldconfig_cache=""
collect_missing
if [[ ${#missing[@]} -ne 0 ]]; then
  echo "$me: installed, but still not found: ${missing[*]}" >&2
  exit 1
fi
echo "$me: installed ${installed[*]}" >&2
