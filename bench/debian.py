"""Debian packages a benchmark needs at bench time (wrk, Postfix's smtp-sink), installed with
apt-get when missing and we are root; otherwise a SystemExit that says what to install.

Only the benchmarks need these: the tests never do, so they are not in
scripts/ensure-system-deps.sh.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

#: where Debian puts programs that are not on a user's PATH (postfix's smtp-sink)
SBIN = ("/usr/sbin", "/sbin")


def find_program(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def ensure_program(program: str, package: str, *, debconf: tuple[str, ...] = ()) -> str:
    """The path of ``program``; installs the Debian ``package`` when it is missing and we are
    root. ``debconf`` lines are preseeded first (debconf-set-selections), so that a package that
    asks questions installs without asking."""
    found = find_program(program)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit(f"this benchmark needs {program}: install the Debian package (apt-get install {package})")
    started = time.monotonic()
    print(f"{program} is missing: installing the Debian package {package} with apt-get (once)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if debconf:
        done = subprocess.run(
            ["debconf-set-selections"], input="\n".join(debconf) + "\n", env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"debconf-set-selections failed:\n{done.stderr[-2000:]}")
    opts = ["-q", "-o", "Dpkg::Use-Pty=0", "-o", "DPkg::Lock::Timeout=300"]
    for cmd in (["update"], ["install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(["apt-get", *opts, *cmd], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"apt-get {' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    found = find_program(program)
    if not found:
        raise SystemExit(f"apt-get installed {package}, but {program} is not on PATH nor in /usr/sbin")
    print(f"installed {package} in {time.monotonic() - started:.0f} s", flush=True)
    return found


def ensure_wrk() -> str:
    return ensure_program("wrk", "wrk")


#: Postfix asks what kind of mail server it should be; "No configuration" writes no main.cf and
#: starts nothing: the bench only wants the smtp-sink program that comes with it.
POSTFIX_DEBCONF = (
    "postfix postfix/main_mailer_type select No configuration",
    "postfix postfix/mailname string localhost",
)


def ensure_smtp_sink() -> str:
    return ensure_program("smtp-sink", "postfix", debconf=POSTFIX_DEBCONF)
