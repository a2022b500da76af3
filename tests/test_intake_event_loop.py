"""The API checks appeals on its event loop (dispatcher/intake/fastpath.py): what may wait on the
network, a quota's Redis call, must not hold up the other requests that loop serves."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx

from dispatcher.app import Service
from dispatcher.intake.signature import sign
from tests.conftest import appeal_body, free_port, make_settings
from tests.support.services import RedisServer
from tests.support.web import LiveApi


def test_an_appeal_waiting_on_a_frozen_redis_for_its_quota_holds_up_no_other_request(
    tmp_path: Path, environ: dict[str, str], catalog: object
) -> None:
    with RedisServer(appendonly=False) as redis_server:
        settings = make_settings(
            tmp_path,
            database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
            redis_url=redis_server.url,
            smtp_port=1,
            section_quota=("600/minute",),  # the production default: counted in Redis
        )
        service = Service(settings, environ=environ)
        service.ledger.migrate()
        body = appeal_body()
        raw = json.dumps(body).encode()
        header = sign(environ[service.catalog.section("us").intake_key_env].encode(), raw)
        answers: dict[str, int] = {}
        try:
            with LiveApi(service, free_port()) as api:
                assert redis_server.pid is not None
                os.kill(redis_server.pid, signal.SIGSTOP)  # Redis hangs: calls wait for its answer
                try:

                    def post() -> None:
                        answers["appeal"] = httpx.post(
                            f"{api.url}/v1/appeals",
                            content=raw,
                            headers={"Dispatch-Signature": header, "Content-Type": "application/json"},
                            timeout=60,
                        ).status_code

                    waiting = threading.Thread(target=post)
                    waiting.start()
                    waiting.join(0.5)  # its quota call is on its way to the frozen Redis
                    assert "appeal" not in answers
                    # another request to the same process is answered meanwhile
                    other = httpx.get(f"{api.url}/openapi.json", timeout=5)
                    assert other.status_code == 200
                    assert "appeal" not in answers
                finally:
                    os.kill(redis_server.pid, signal.SIGCONT)
                waiting.join(30)
            assert answers["appeal"] == 202
        finally:
            service.ledger.dispose()
