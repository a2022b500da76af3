"""Worker processes for tests: ``dispatcher worker`` as a real subprocess with its JSON log, the
environment that points it at a test's service, and what the ledger and the SMTP server saw of
its sends. Used by the shutdown and liveness tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dispatcher.app import Service
from dispatcher.ledger.models import Attempt, Delivery
from tests.conftest import ROOT


def worker_env(service: Service, environ: dict[str, str], **extra: str) -> dict[str, str]:
    s = service.settings
    return {
        **os.environ,
        **environ,
        "DATABASE_URL": s.database_url,
        "REDIS_URL": s.redis_url,
        "DISPATCH_REDIS_NAMESPACE": s.redis_namespace,
        "DISPATCH_CONFIG_DIR": str(s.config_dir),
        "DISPATCH_TEMPLATES_DIR": str(s.templates_dir),
        "DISPATCH_VAR_DIR": str(s.var_dir),
        "DISPATCH_SANDBOX_SMTP": f"127.0.0.1:{s.sandbox_smtp_port}",
        "DISPATCH_DEMO_CAMPAIGNS": "1",
        "DISPATCH_EMAIL_LIMITS": "",
        "DISPATCH_FAX_LIMITS": "",
        "DISPATCH_OFFICE_HOURS": "0",
        "DISPATCH_LOG_LEVEL": "INFO",
        **extra,
    }


class Worker:
    """``dispatcher worker`` in a subprocess, its JSON log in a file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str):
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "worker", *args],
            env=env,
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def terminate(self) -> float:
        """SIGTERM; returns the seconds until the process exited."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        return time.monotonic() - started

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                out.append(event)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._out.close()


def sent_by(service: Service) -> dict[str, list[tuple[str, str]]]:
    """Per delivery: (outcome, worker pid) of each attempt."""
    with service.ledger.session() as s:
        rows = s.execute(select(Attempt.delivery_id, Attempt.outcome, Attempt.worker).order_by(Attempt.id)).all()
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r.delivery_id, []).append((r.outcome, r.worker.split(":")[1]))
    return out


def message_ids(smtp: Any) -> Counter[str]:
    """Message-IDs as the SMTP server received them, with how often."""
    return Counter(m.message["Message-ID"] for m in smtp.messages)


def planned_message_id(service: Service, delivery_id: str) -> str:
    with service.ledger.session() as s:
        return str(s.execute(select(Delivery.message_id).where(Delivery.id == delivery_id)).scalar_one())
