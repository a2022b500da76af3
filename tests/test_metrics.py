"""Prometheus metrics after real runs: appeals signed and posted to the API, letters sent by a real
worker to the real SMTP test server (email) and the fax lab (fax), then every scrape parsed with
prometheus_client's own parser and held against the ledger and the requests made.

* the API's /metrics with the worker and reconciler in the same process (as ``dispatcher dev``
  runs them), on SQLite and PostgreSQL;
* ``dispatcher worker --metrics-port`` and ``dispatcher reconcile --metrics-port`` as processes;
* ``dispatcher api --workers 2`` (multiprocess mode: any process answers with every process's
  counts), and two processes writing one directory that one scrape sums;
* a paused channel and the deferrals it causes, with their reason; a bounce counted by the
  process that applied it (``dispatcher bounces``); ``DISPATCH_METRICS_TOKEN``;
* the alert rules in docs/prometheus/alerts.yml name only metrics the service exposes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dispatcher.app import Service
from dispatcher.ledger.models import Attempt, Delivery
from dispatcher.ledger.states import TERMINAL, State
from dispatcher.metrics.exposition import MULTIPROC_ENV, Scrape
from dispatcher.settings import Settings
from tests.conftest import ROOT, appeal_body, make_settings, signed_post, wait_for
from tests.support.services import free_port, wait_for_port
from tests.support.workers import Worker, worker_env

Labels = tuple[tuple[str, str], ...]
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def bounce_intake(tmp_path: Path, database_url: str, redis_server: Any) -> Iterator[Any]:
    """A service whose letters go to a relay that accepts them, and its ``dispatcher bounces``
    (tests/test_bounce_intake.py)."""
    from tests.test_bounce_intake import running_intake

    with running_intake(tmp_path, database_url, redis_server) as started:
        yield started


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path, database_url: str, redis_server: Any) -> Settings:
    """The suite's settings, with a fax line busy for a moment only: every appeal writes to the
    same fax number (one call at a time), and the letters behind it wait 0.2 s, not a minute."""
    port = request.getfixturevalue("smtp").port if "smtp" in request.fixturenames else free_port()
    return make_settings(
        tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=port, fax_line_wait_seconds=0.2
    )


def samples(text: str) -> dict[str, dict[Labels, float]]:
    """Sample name → labels → value, from an exposition parsed by prometheus_client."""
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by(found: dict[str, dict[Labels, float]], name: str, *keys: str, **where: str) -> Counter[tuple[str, ...]]:
    """The samples of ``name`` matching ``where``, summed by the labels ``keys``."""
    total: Counter[tuple[str, ...]] = Counter()
    for labels, value in found.get(name, {}).items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in where.items()):
            total[tuple(d[k] for k in keys)] += value
    return total


def ledger_letters(service: Service) -> Counter[tuple[str, str, str]]:
    with service.ledger.session() as s:
        rows = s.execute(
            select(Delivery.channel, Delivery.section, Delivery.state, func.count()).group_by(
                Delivery.channel, Delivery.section, Delivery.state
            )
        ).all()
    return Counter({(c, sec, st): n for c, sec, st, n in rows})


def settled(service: Service) -> bool:
    """Every letter final, or sent on a channel that learns nothing at once (email)."""
    states = {state for (_, _, state) in ledger_letters(service)}
    return bool(states) and states <= {s.value for s in TERMINAL} | {State.SENT.value}


def post_run(
    client: Any, environ: dict[str, str], catalog: Any, n: int
) -> tuple[list[str], Counter[tuple[str, str, str]]]:
    """``n`` appeals accepted, one refused as forged, one as a duplicate, each appeal read once;
    returns the appeal ids and the requests made as (method, route, status)."""
    made: Counter[tuple[str, str, str]] = Counter()
    ids = []
    for _ in range(n):
        r = signed_post(client, environ, catalog, appeal_body())
        assert r.status_code == 202, r.text
        ids.append(r.json()["appeal_id"])
        made["POST", "/v1/appeals", "202"] += 1
    twice = appeal_body()
    assert signed_post(client, environ, catalog, twice).status_code == 202
    twice["client_ref"] = "another-form"
    assert signed_post(client, environ, catalog, twice).status_code == 409
    assert signed_post(client, environ, catalog, appeal_body(), key="not-the-key").status_code == 401
    made["POST", "/v1/appeals", "202"] += 1
    made["POST", "/v1/appeals", "409"] += 1
    made["POST", "/v1/appeals", "401"] += 1
    for appeal_id in ids:
        assert client.get(f"/v1/appeals/{appeal_id}").status_code == 200
        made["GET", "/v1/appeals/{appeal_id}", "200"] += 1
    assert client.get("/v1/appeals/ap_nothing").status_code == 404
    made["GET", "/v1/appeals/{appeal_id}", "404"] += 1
    return made


def assert_outcomes_match_the_ledger(found: dict[str, dict[Labels, float]], service: Service) -> None:
    letters = ledger_letters(service)
    for channel in {c for (c, _, _) in letters}:
        for state in ("sent", "delivered", "bounced", "failed"):
            in_ledger = sum(n for (c, _, s), n in letters.items() if c == channel and s == state)
            assert by(found, "dispatch_outcomes_total", result=state, channel=channel)[()] == in_ledger, (
                channel,
                state,
            )
    # every try the worker recorded is counted once (a deferral writes no attempt row)
    with service.ledger.session() as s:
        tries = s.execute(select(func.count()).select_from(Attempt)).scalar_one()
    counted = sum(v for labels, v in found["dispatch_outcomes_total"].items() if dict(labels)["class"] != "deferred")
    assert counted == tries


def test_api_metrics_after_a_run_of_real_letters_match_the_ledger(client, environ, catalog, smtp, service, running):
    """Worker and reconciler in the API's process, as ``dispatcher dev`` runs them: one /metrics."""
    made = post_run(client, environ, catalog, 3)
    wait_for(lambda: settled(service), timeout=60)
    found = samples(client.get("/metrics").text)

    # letters by channel, section and state: the ledger's own count
    assert by(found, "dispatch_letters", "channel", "section", "state") == ledger_letters(service)
    assert_outcomes_match_the_ledger(found, service)
    sent_email = sum(n for (c, _, s), n in ledger_letters(service).items() if c == "email" and s == "sent")
    assert sent_email == 4 * len([r for r in catalog.routes("UA-002-19", "us") if r.channel == "email"])
    # letters behind a fax in flight to the same number were held back, and said why
    deferred = by(found, "dispatch_outcomes_total", "channel", result="deferred")
    assert by(found, "dispatch_deferrals_total", "channel") == deferred
    assert set(by(found, "dispatch_deferrals_total", "reason")) <= {("line_busy",)}
    # every send timed (a letter held back never reached its channel)
    sends = by(found, "dispatch_send_duration_seconds_count", "channel")
    assert sends == by(found, "dispatch_outcomes_total", "channel") - deferred
    # the fax lab's facts, counted where they were recorded: the ledger has the same totals
    with service.ledger.session() as s:
        pages, line_seconds = s.execute(
            select(func.sum(Delivery.pages), func.sum(Delivery.line_seconds)).where(Delivery.channel == "fax")
        ).one()
    assert pages and by(found, "dispatch_pages_total", "channel")[("fax",)] == pages
    assert by(found, "dispatch_line_seconds_total", "channel")[("fax",)] == pytest.approx(line_seconds)

    # the API's requests, by route template and status: exactly the requests made
    assert by(found, "dispatch_api_requests_total", "method", "route", "status") == made
    assert by(found, "dispatch_api_request_duration_seconds_count", "method", "route") == _summed_by_route(made)

    # the queue, nothing waiting; the reconciler leads and ticks; nothing paused
    assert found["dispatch_queue_up"][()] == 1 and found["dispatch_ledger_up"][()] == 1
    assert by(found, "dispatch_queue_messages")[()] == 0
    assert found["dispatch_reconciler_leader"][()] == 1
    assert found["dispatch_reconciler_ticks_total"][()] > 0
    # intake queued every letter itself; the reconciler queued those held back, once each
    assert found["dispatch_reconciler_released_letters_total"][()] == sum(deferred.values())
    paused = by(found, "dispatch_channel_paused", "channel", "section")
    assert paused[("email", "us")] == 0 and paused[("fax", "ch")] == 0 and set(paused.values()) == {0}
    assert found["dispatch_dead_letters"][()] == 0
    # no label carries a supporter, an address, a number or an id
    values = {v for series in found.values() for labels in series for _, v in labels}
    assert values and not [v for v in values if re.search(r"@|^\+?\d{5,}$|^(ap|dl)_|Jane", v)]


def _summed_by_route(made: Counter[tuple[str, str, str]]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for (method, route, _), n in made.items():
        out[method, route] += n
    return out


@SQLITE_ONLY
def test_a_paused_channel_and_deferrals_show_with_their_reason(client, environ, catalog, smtp, service, running):
    from datetime import UTC, datetime

    service.ledger.controls.pause_channel("email:us", "535 authentication failed", datetime.now(UTC))
    r = signed_post(client, environ, catalog, appeal_body())
    email = next(d["id"] for d in r.json()["deliveries"] if d["channel"] == "email")
    wait_for(lambda: service.ledger.views.delivery(email).last_outcome == "deferred")
    found = samples(client.get("/metrics").text)
    assert by(found, "dispatch_channel_paused", "channel", "section")[("email", "us")] == 1
    assert by(found, "dispatch_deferrals_total", "channel", "reason")[("email", "paused")] == 1
    assert by(found, "dispatch_outcomes_total", "channel", "result", "class")[("email", "deferred", "deferred")] == 1
    # the letter waits, planned for later: not due, so not overdue
    letters = by(found, "dispatch_letters", "channel", "state")
    assert letters[("email", "planned")] == 1


@SQLITE_ONLY
def test_worker_and_reconciler_processes_serve_their_own_metrics(tmp_path, client, environ, catalog, smtp, service):
    env = worker_env(service, environ, DISPATCH_FAX_LINE_WAIT_SECONDS="1")
    worker_port, reconciler_port = free_port(), free_port()
    worker = Worker(env, tmp_path / "worker.log", "--threads", "2", "--metrics-port", str(worker_port))
    with (tmp_path / "reconciler.log").open("wb") as out:
        reconciler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dispatcher.cli",
                "reconcile",
                "--interval",
                "0.2",
                "--metrics-port",
                str(reconciler_port),
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port("127.0.0.1", worker_port, timeout=30)
            wait_for_port("127.0.0.1", reconciler_port, timeout=30)
            made = post_run(client, environ, catalog, 2)
            wait_for(lambda: settled(service), timeout=60)
            from_worker = samples(httpx.get(f"http://127.0.0.1:{worker_port}/metrics").text)
            from_reconciler = samples(httpx.get(f"http://127.0.0.1:{reconciler_port}/metrics").text)
        finally:
            reconciler.terminate()
            reconciler.wait(20)
            worker.terminate()
            worker.close()
    assert_outcomes_match_the_ledger(from_worker, service)
    assert from_worker["process_cpu_seconds_total"][()] > 0
    # a worker's port shows its own counts, not the ledger's gauges (those are the API's)
    assert "dispatch_letters" not in from_worker and "dispatch_api_requests_total" not in from_worker
    assert from_reconciler["dispatch_reconciler_ticks_total"][()] > 0
    assert from_reconciler["dispatch_reconciler_leader"][()] == 1
    assert from_reconciler["dispatch_reconciler_last_tick_timestamp_seconds"][()] > time.time() - 60
    assert "dispatch_outcomes_total" not in from_reconciler
    # and the API in this process counted exactly its requests
    api = samples(client.get("/metrics").text)
    assert by(api, "dispatch_api_requests_total", "method", "route", "status") == made
    assert by(api, "dispatch_letters", "channel", "section", "state") == ledger_letters(service)


_WRITER = """
import sys
from dispatcher.metrics.instruments import Metrics
m = Metrics()
n = int(sys.argv[1])
m.api.requests.labels("POST", "/v1/appeals", "202").inc(n)
m.api.seconds.labels("POST", "/v1/appeals").observe(0.01)
m.worker.outcomes.labels("email", "sent", "sent").inc(n * 10)
"""


def test_two_processes_write_and_one_scrape_sees_the_sum(tmp_path):
    directory = tmp_path / "multiproc"
    directory.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), MULTIPROC_ENV: str(directory)}
    for n in (3, 4):
        subprocess.run([sys.executable, "-c", _WRITER, str(n)], env=env, cwd=ROOT, check=True, timeout=60)
    assert len(list(directory.glob("counter_*.db"))) == 2  # one file per process
    found = samples(Scrape(CollectorRegistry(), environ={MULTIPROC_ENV: str(directory)}).render().decode())
    assert by(found, "dispatch_api_requests_total", "route", "status")[("/v1/appeals", "202")] == 7
    assert by(found, "dispatch_api_request_duration_seconds_count", "route")[("/v1/appeals",)] == 2
    assert by(found, "dispatch_outcomes_total", "result")[("sent",)] == 70


@SQLITE_ONLY
def test_api_with_two_processes_answers_every_scrape_with_all_their_requests(tmp_path, service, environ):
    port = free_port()
    # the operator's own directory, holding counts from an earlier run: emptied at start
    directory = tmp_path / "api-metrics"
    directory.mkdir()
    writer_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), MULTIPROC_ENV: str(directory)}
    subprocess.run([sys.executable, "-c", _WRITER, "5"], env=writer_env, cwd=ROOT, check=True, timeout=60)
    env = worker_env(service, environ, **{MULTIPROC_ENV: str(directory)})
    with (tmp_path / "api.log").open("wb") as out:
        api = subprocess.Popen(
            [sys.executable, "-m", "dispatcher.cli", "api", "--port", str(port), "--workers", "2"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port("127.0.0.1", port, timeout=60)
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200, timeout=30)
            made = 1
            for _ in range(40):  # a new connection each: the kernel spreads them over both processes
                assert httpx.get(f"{base}/healthz", headers={"Connection": "close"}).status_code == 200
                made += 1
            scrapes = [samples(httpx.get(f"{base}/metrics", headers={"Connection": "close"}).text) for _ in range(6)]
        finally:
            api.terminate()
            api.wait(30)
    for found in scrapes:
        assert found["dispatch_ledger_up"][()] == 1
        assert by(found, "dispatch_api_requests_total", "route")[("/v1/appeals",)] == 0  # the earlier run's
    # whichever process answered, the same total (the requests before the scrapes are all counted)
    totals = {by(f, "dispatch_api_requests_total", "route", "status")[("/healthz", "200")] for f in scrapes}
    assert totals == {made}


def exposed_names(service: Service) -> set[str]:
    metrics = service.metrics
    for group in (metrics.worker, metrics.reports, metrics.reconciler, metrics.api):
        assert group is not None
    names = set()
    for family in text_string_to_metric_families(service.scrape().render().decode()):
        # the names a query uses, whether or not a labelled family has samples yet
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


@SQLITE_ONLY
def test_alert_rules_are_valid_yaml_and_name_only_metrics_that_exist(service):
    rules = yaml.safe_load((ROOT / "docs" / "prometheus" / "alerts.yml").read_text())
    names = exposed_names(service) | {"up"}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "DispatchDeadLettersGrowing",
        "DispatchChannelPaused",
        "DispatchLettersWaitingNothingSent",
        "DispatchBounceRateHigh",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket"), alert["alert"]
        assert alert["annotations"]["summary"], alert["alert"]
        used = set(re.findall(r"\b((?:dispatch|process)_[a-z_]+)\b", alert["expr"]))
        assert used, alert["alert"]
        assert used <= names, (alert["alert"], used - names)


@SQLITE_ONLY
def test_metrics_need_the_token_when_one_is_set(settings, environ):
    from fastapi.testclient import TestClient

    from dispatcher.metrics.exposition import TOKEN_ENV

    service = Service(settings, environ={**environ, TOKEN_ENV: "a-long-scrape-token"})
    service.ledger.migrate()
    with TestClient(service.api()) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        answer = client.get("/metrics", headers={"Authorization": "Bearer a-long-scrape-token"})
        assert answer.status_code == 200
        assert "dispatch_letters" in samples(answer.text) or "dispatch_ledger_up" in samples(answer.text)
        # not part of the public contract's document
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    service.ledger.dispose()


@SQLITE_ONLY
def test_bounces_are_counted_where_they_are_applied(bounce_intake):
    """What ``dispatcher bounces --metrics-port`` serves: each bounce it applied, by what it did."""
    letters = bounce_intake.send_letters(2)
    assert bounce_intake.bounce(letters[0], "postfix_hard.eml") == 250
    service = bounce_intake.service
    found = samples(service.scrape(service_wide=False).render().decode())
    assert by(found, "dispatch_reports_total", "channel", "result") == Counter({("email", "bounced"): 1})
    assert by(found, "dispatch_outcomes_total", "channel", "result") == Counter({("email", "sent"): 2})
    assert bounce_intake.state(letters[0]) == "bounced" and bounce_intake.state(letters[1]) == "sent"
