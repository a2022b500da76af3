"""Provider limits (a relay's or a gateway account's) at send time, against a real Redis."""

from __future__ import annotations

from datetime import UTC, datetime

from dispatcher.channels.builtin import builtin_channels
from tests.conftest import ROOT, make_settings


def test_relay_limit_holds_across_recipients_and_gives_back_the_recipients_slot(redis_server, catalog):
    import uuid

    import redis as redis_lib

    from dispatcher.errors import DeferredError
    from dispatcher.policy.gate import SendingGate
    from dispatcher.policy.limits import Rate, RateLimiter

    limiter = RateLimiter(redis_lib.Redis.from_url(redis_server.url), f"t-{uuid.uuid4().hex[:8]}")
    settings = make_settings(
        ROOT, database_url="sqlite://", redis_url=redis_server.url, smtp_port=1, email_limits=("5/minute",)
    )
    gate = SendingGate(limiter, settings, builtin_channels())
    target = catalog.target("UA-002-19", "us", "ambassador-us")
    now = datetime.now(UTC)
    admitted = []
    for n in range(3):  # three letters to three different recipients through one relay
        try:
            gate.admit(
                target=target,
                channel="email",
                recipient=f"r{n}@example.org",
                token=f"dl_{n}:1",
                now=now,
                provider="relay:smtp.example:587",
                provider_rates=("2/minute",),
            )
            admitted.append(n)
        except DeferredError as exc:
            assert "relay:smtp.example:587's limit is used up" in exc.message
            assert 0 < exc.retry_after <= 60 + 60 / 2
    assert admitted == [0, 1]
    # the third recipient's own slot was given back: its cap shows nothing used
    assert limiter.usage("recipient:email:r2@example.org", [Rate.parse("5/minute")]) == [0]
    assert limiter.usage("recipient:email:r0@example.org", [Rate.parse("5/minute")]) == [1]


def test_relay_limits_load_from_config_and_bad_ones_name_file_and_key(tmp_path):
    import shutil

    import pytest

    from dispatcher.config.loader import load_catalog
    from dispatcher.errors import ConfigError

    config = tmp_path / "config"
    shutil.copytree(ROOT / "config", config)
    section = config / "sections" / "us.toml"
    text = section.read_text()
    section.write_text(text.replace('tls = "starttls"', 'tls = "starttls"\nrate = ["10/second", "10000/day"]'))
    catalog = load_catalog(config, ROOT / "templates")
    assert catalog.section("us").smtp.rate == ("10/second", "10000/day")
    hash(catalog.section("us").smtp)  # one SMTP pool per relay config: it must stay hashable
    section.write_text(text.replace('tls = "starttls"', 'tls = "starttls"\nrate = ["ten a second"]'))
    with pytest.raises(ConfigError) as info:
        load_catalog(config, ROOT / "templates")
    assert any(p.key.startswith("smtp.rate") and "us.toml" in p.file for p in info.value.problems), info.value
