"""Operators' accounts: the `dispatcher operators` commands and the ledger's store behind them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner
from sqlalchemy import select

from dispatcher.cli import main
from dispatcher.errors import OperatorError
from dispatcher.ledger.operators import Operators
from dispatcher.ledger.tables import OP

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

PASSWORD = "correct horse battery"


@pytest.fixture
def run(service, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", service.settings.database_url)
    monkeypatch.setenv("DISPATCH_VAR_DIR", str(service.settings.var_dir))
    runner = CliRunner()
    return lambda *args, **kw: runner.invoke(main, list(args), catch_exceptions=False, **kw)


def test_an_operator_is_added_with_a_prompted_password_and_can_sign_in(run, service):
    added = run("operators", "add", "maria", "--role", "operator", "--section", "us", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert added.exit_code == 0, added.output
    assert "operator maria added (operator, sections us)" in added.output
    account = service.ledger.operators.verify("maria", PASSWORD)
    assert account is not None and (account.role, account.sections) == ("operator", ("us",))
    assert service.ledger.operators.verify("maria", "another password") is None
    with service.ledger.session(read_only=True) as s:
        stored = s.execute(select(OP.c.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and PASSWORD not in stored
    [entry] = service.ledger.audit.entries()
    assert (entry.action, entry.target_id, entry.detail) == ("operator.add", "maria", "operator, sections us")
    assert entry.actor.startswith("cli:")


def test_a_password_that_differs_on_confirmation_is_asked_again(run, service):
    added = run(
        "operators", "add", "ada", "--role", "admin", input=f"{PASSWORD}\nsomething else\n{PASSWORD}\n{PASSWORD}\n"
    )
    assert added.exit_code == 0
    assert service.ledger.operators.verify("ada", PASSWORD) is not None


def test_unknown_sections_roles_and_short_passwords_are_refused(run, service):
    unknown = run("operators", "add", "x", "--role", "viewer", "--section", "zz", "--password-stdin", input=PASSWORD)
    assert unknown.exit_code == 2 and "unknown section 'zz'" in unknown.output
    role = run("operators", "add", "x", "--role", "root", "--password-stdin", input=PASSWORD)
    assert role.exit_code == 2
    short = run("operators", "add", "x", "--role", "viewer", "--password-stdin", input="short\n")
    assert short.exit_code == 1 and "shorter than 12 characters" in short.output
    admin_scoped = run(
        "operators", "add", "x", "--role", "admin", "--section", "us", "--password-stdin", input=PASSWORD
    )
    assert admin_scoped.exit_code == 1 and "an admin works on every section" in admin_scoped.output
    unscoped = run("operators", "add", "x", "--role", "operator", "--password-stdin", input=PASSWORD)
    assert unscoped.exit_code == 1 and "give at least one" in unscoped.output
    assert service.ledger.operators.list() == []


def test_a_name_is_taken_once(run):
    assert run("operators", "add", "sam", "--role", "viewer", "--password-stdin", input=PASSWORD).exit_code == 0
    again = run("operators", "add", "sam", "--role", "admin", "--password-stdin", input=PASSWORD)
    assert again.exit_code == 1 and "exists already" in again.output


def test_passwd_changes_the_password_and_ends_every_session(run, service):
    run("operators", "add", "lee", "--role", "viewer", "--section", "ch", "--password-stdin", input=PASSWORD)
    now = datetime.now(UTC)
    opened = service.ledger.operators.open_session("lee", now=now, lifetime=timedelta(hours=8))
    assert service.ledger.operators.session(opened.token, now=now) is not None
    changed = run("operators", "passwd", "lee", "--password-stdin", input="a new long password\n")
    assert changed.exit_code == 0
    assert service.ledger.operators.verify("lee", PASSWORD) is None
    assert service.ledger.operators.verify("lee", "a new long password") is not None
    assert service.ledger.operators.session(opened.token, now=now) is None
    assert run("operators", "passwd", "nobody", "--password-stdin", input=PASSWORD).exit_code == 1
    assert [e.action for e in service.ledger.audit.entries()] == ["operator.passwd", "operator.add"]


def test_remove_and_list(run, service):
    run(
        "operators",
        "add",
        "kim",
        "--role",
        "operator",
        "--section",
        "us",
        "--section",
        "ca",
        "--password-stdin",
        input=PASSWORD,
    )
    run("operators", "add", "ada", "--role", "admin", "--password-stdin", input=PASSWORD)
    listed = json.loads(run("operators", "list", "--json").output)
    assert [(r["name"], r["role"], r["sections"]) for r in listed] == [
        ("ada", "admin", []),
        ("kim", "operator", ["us", "ca"]),
    ]
    table = run("operators", "list").output
    assert "kim" in table and "us ca" in table
    now = datetime.now(UTC)
    opened = service.ledger.operators.open_session("kim", now=now, lifetime=timedelta(hours=1))
    assert run("operators", "remove", "kim").exit_code == 0
    assert service.ledger.operators.get("kim") is None
    assert service.ledger.operators.session(opened.token, now=now) is None
    assert run("operators", "remove", "kim").exit_code == 1
    assert "operator.remove" in [e.action for e in service.ledger.audit.entries()]


def test_sessions_keep_only_a_hash_and_expire(service):
    store = service.ledger.operators
    store.add("eve", PASSWORD, role="viewer", now=datetime.now(UTC), actor="test")
    now = datetime.now(UTC)
    opened = store.open_session("eve", now=now, lifetime=timedelta(hours=1))
    live = store.session(opened.token, now=now + timedelta(minutes=59))
    assert live is not None and live.operator.name == "eve" and live.csrf == opened.csrf
    assert store.session(opened.token, now=now + timedelta(hours=1)) is None
    assert store.session("not-a-token", now=now) is None
    assert store.purge_sessions(now + timedelta(hours=2)) == 1
    assert store.close_session(opened.token) is False


def test_a_hash_made_with_weaker_parameters_is_replaced_at_the_next_sign_in(service):
    weak = Operators(service.ledger.engine, PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1))
    weak.add("old", PASSWORD, role="viewer", now=datetime.now(UTC), actor="test")
    with service.ledger.session(read_only=True) as s:
        before = s.execute(select(OP.c.password_hash)).scalar_one()
    assert service.ledger.operators.verify("old", PASSWORD) is not None
    with service.ledger.session(read_only=True) as s:
        after = s.execute(select(OP.c.password_hash)).scalar_one()
    assert after != before and "m=65536" in after
    assert service.ledger.operators.verify("old", PASSWORD) is not None


def test_the_store_refuses_bad_names(service):
    with pytest.raises(OperatorError, match="name"):
        service.ledger.operators.add("has space", PASSWORD, role="viewer", now=datetime.now(UTC), actor="test")


def test_dev_mode_makes_its_admin_once_and_shows_its_password_again(service):
    from dispatcher.dev import ensure_dev_admin

    first = ensure_dev_admin(service.settings, service.ledger)
    password = first.split(" / ")[1].split()[0]
    assert first.startswith("dev-admin / ") and "(new; kept in" in first
    assert service.ledger.operators.verify("dev-admin", password).role == "admin"
    assert ensure_dev_admin(service.settings, service.ledger).startswith(f"dev-admin / {password}  (from ")
    service.ledger.operators.passwd("dev-admin", "chosen by a person", now=datetime.now(UTC), actor="test")
    again = ensure_dev_admin(service.settings, service.ledger)
    assert password not in again and "operators passwd dev-admin" in again
    assert service.ledger.operators.verify("dev-admin", "chosen by a person") is not None


def test_the_channel_commands_are_audited_as_the_cli_user(run, service):
    now = datetime.now(UTC)
    service.ledger.controls.pause_channel("email:us", "relay refused our login", now)
    service.ledger.controls.flag_number("+41315550100", "no fax tone", None, now)
    assert run("channel", "resume", "email:us").exit_code == 0
    assert run("fax", "unflag", "+41315550100").exit_code == 0
    entries = service.ledger.audit.entries()
    assert [(e.action, e.target_id, e.section) for e in entries] == [
        ("number.unflag", "+41315550100", None),
        ("channel.resume", "email:us", "us"),
    ]
    assert all(e.actor.startswith("cli:") for e in entries)
