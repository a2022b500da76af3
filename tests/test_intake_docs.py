"""docs/intake.md's sign-and-post examples, run as a form developer would run them: each block,
copied out of the markdown as it stands, by the real interpreter (php, node, python) against our
API served by uvicorn on a loopback port. So the docs cannot drift from what works."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from dispatcher.app import Service
from dispatcher.ledger.models import Appeal
from tests.conftest import ROOT
from tests.support.services import free_port
from tests.support.web import LiveApi

DOC = ROOT / "docs" / "intake.md"
#: a fenced block right after ``<!-- example: NAME -->`` is the example NAME
EXAMPLE = re.compile(r"^<!-- example: (\w+) -->\n```\w*\n(.*?)^```$", re.MULTILINE | re.DOTALL)
#: interpreter and file name, as the docs tell the reader to run each
RUN = {
    "php": ("php", "sign-and-post.php", "php-cli php-curl"),
    "node": ("node", "sign-and-post.mjs", "nodejs"),
    "python": (sys.executable, "sign_and_post.py", ""),
}


def examples() -> dict[str, str]:
    return {name: code for name, code in EXAMPLE.findall(DOC.read_text())}


def test_the_docs_have_one_example_per_language():
    assert sorted(examples()) == sorted(RUN)


@pytest.fixture
def api_url(service: Service) -> Iterator[str]:
    with LiveApi(service, free_port()) as api:
        yield api.url


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("language", sorted(RUN))
def test_example_signs_posts_and_shows_replay_and_tampering(language, api_url, service, environ, tmp_path):
    interpreter, filename, debian = RUN[language]
    found = shutil.which(interpreter)
    assert found, f"{interpreter} not found: run scripts/ensure-system-deps.sh (Debian: {debian})"
    program = tmp_path / filename
    program.write_text(examples()[language])
    # Only what the docs say the program reads: the key (a hex-looking text, used as text) and
    # the address. No proxy variables: loopback only.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "DISPATCH_URL": api_url,
        "DISPATCH_INTAKE_KEY_US": environ["DISPATCH_INTAKE_KEY_US"],
    }
    done = subprocess.run([found, str(program)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    answers = []
    for line in lines:
        status, _, body = line.partition(" ")
        answers.append((int(status), json.loads(body)))
    (first_status, first), (again_status, again), (tampered_status, tampered) = answers

    assert first_status == 202, first
    assert first["replayed"] is False
    assert again_status == 202, again
    assert again["replayed"] is True
    assert again["appeal_id"] == first["appeal_id"]
    assert {d["id"] for d in again["deliveries"]} == {d["id"] for d in first["deliveries"]}
    assert tampered_status == 401, tampered
    assert tampered["error"]["code"] == "invalid_signature"

    with service.ledger.session() as s:
        stored = s.scalars(select(Appeal)).all()
    assert [(a.id, a.client_ref) for a in stored] == [(first["appeal_id"], "submission 1042")]
