"""config/ loading: the shipped UA 002/19 configuration, and what admins see when they break it.

The shipped files hold real offices' contact data; these tests never repeat it. Expected values
are read from the loaded catalog or the TOML files themselves.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import phonenumbers
import pytest

from dispatcher.channels.builtin import builtin_channels
from dispatcher.config.catalog import Catalog
from dispatcher.config.loader import check_environment, load_catalog
from dispatcher.errors import ConfigError, ConfigProblem

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
UA = "UA-002-19"


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(CONFIG)


# --------------------------------------------------------------------------- shipped config


def test_shipped_config_loads_every_section_and_the_campaign(catalog: Catalog) -> None:
    assert set(catalog.campaigns) == {UA}
    assert set(catalog.sections) == {"ch", "ca", "us", "uk"}
    assert {catalog.section(c).country for c in catalog.sections} == {"CH", "CA", "US", "GB"}
    assert catalog.sources["us"] == CONFIG.resolve() / "sections" / "us.toml"
    campaign = catalog.campaign(UA)
    assert campaign.sandbox_only, "UA 002/19 targets real offices: it must never be sent live"
    assert campaign.default_language in campaign.letter_languages


def test_shipped_config_has_a_template_folder_for_every_letter_language() -> None:
    load_catalog(CONFIG, ROOT / "templates")


def _raw_fax(relative: str, target: str) -> str:
    with (CONFIG / relative).open("rb") as fh:
        return tomllib.load(fh)["targets"][target]["fax"]


@pytest.mark.parametrize(
    ("file", "target_id", "region"),
    [
        ("campaigns/UA-002-19.toml", "president", "RU"),
        ("campaigns/UA-002-19.toml", "ambassador-us", "US"),
        # Written in Swiss national format: only the section's country makes it readable.
        ("sections/ch.toml", "embassy-ru", "CH"),
    ],
)
def test_fax_numbers_are_normalised_to_e164_in_the_right_country(
    catalog: Catalog, file: str, target_id: str, region: str
) -> None:
    fax = catalog.target(UA, "ch", target_id).fax
    assert fax is not None and fax.startswith("+")
    number = phonenumbers.parse(fax, None)
    assert phonenumbers.is_valid_number(number)
    assert phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164) == fax
    assert phonenumbers.region_code_for_number(number) == region
    # Same number as the admin wrote it, just reformatted.
    assert phonenumbers.parse(_raw_fax(file, target_id), region) == number


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("ch", {("president", "fax", "campaign"), ("embassy-ru", "fax", "copy")}),
        ("us", {("president", "fax", "campaign"), ("ambassador-us", "email", "campaign")}),
        ("ca", {("president", "fax", "campaign")}),
        ("uk", {("president", "fax", "campaign")}),
    ],
)
def test_each_section_plans_the_letters_its_document_describes(
    catalog: Catalog, section: str, expected: set[tuple[str, str, str]]
) -> None:
    routes = catalog.routes(UA, section)
    assert {(r.target.id, r.channel, r.kind) for r in routes} == expected
    assert len(routes) == len(expected)
    assert all(builtin_channels().address_of(r.target, r.channel) for r in routes)


def test_swiss_deadline_is_the_end_of_26_february_in_zurich(catalog: Catalog) -> None:
    end = catalog.deadline_at(UA, "ch")
    assert end == datetime(2019, 2, 27, tzinfo=ZoneInfo("Europe/Zurich"))
    # Earlier than the international deadline: the Swiss section set its own.
    assert end < catalog.deadline_at(UA, "us")


@pytest.mark.parametrize("section", ["us", "ca", "uk"])
def test_other_sections_close_at_the_end_of_17_may_in_their_own_timezone(catalog: Catalog, section: str) -> None:
    tz = ZoneInfo(catalog.section(section).timezone)
    assert catalog.deadline_at(UA, section) == datetime(2019, 5, 18, tzinfo=tz)


def test_demo_copy_is_open_with_the_original_window(catalog: Catalog) -> None:
    today = date(2031, 6, 1)
    demo = catalog.with_demo_copies(today)
    original, copy = demo.campaign(UA), demo.campaign(UA + "-DEMO")
    assert copy.status == "open" and copy.issued == today
    assert copy.deadline - copy.issued == original.deadline - original.issued
    assert copy.templates == original.templates
    # The Swiss section's own, shorter window moves with it.
    swiss = demo.participation(UA + "-DEMO", "ch").deadline
    assert swiss is not None and swiss - today == date(2019, 2, 26) - original.issued
    assert demo.deadline_at(UA + "-DEMO", "ch") > datetime(2031, 6, 1, tzinfo=ZoneInfo("UTC"))
    assert [(r.target.id, r.channel) for r in demo.routes(UA + "-DEMO", "us")] == [
        (r.target.id, r.channel) for r in catalog.routes(UA, "us")
    ]


# --------------------------------------------------------------------------- broken configs

_example = phonenumbers.example_number_for_type("CH", phonenumbers.PhoneNumberType.FIXED_LINE)
assert _example is not None
_CH_FAX: phonenumbers.PhoneNumber = _example
FAX_INTL = phonenumbers.format_number(_CH_FAX, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
FAX_NATIONAL = phonenumbers.format_number(_CH_FAX, phonenumbers.PhoneNumberFormat.NATIONAL)

CAMPAIGN_FILE = "campaigns/UA-900-24.toml"
CAMPAIGN = """\
[campaign]
id = "UA-900-24"
title = "Test action"
ai_index = "TST 00/0000/2024"
issued = 2024-01-10
deadline = 2024-03-01
preferred_languages = ["en"]
letter_languages = ["en", "fr"]
default_language = "en"

[targets.minister]
name = "Minister of Examples"
country = "CH"
timezone = "Europe/Zurich"
languages = ["fr", "en"]
fax = "@FAX_INTL@"
salutation = { en = "Dear Minister,", fr = "Monsieur le Ministre," }

[targets.office]
name = "Office of Examples"
country = "CH"
timezone = "Europe/Zurich"
languages = ["en"]
email = "office@ministry.example"
salutation = { en = "Dear Sir or Madam," }
"""

SECTION_FILE = "sections/zz.toml"
SECTION = """\
[section]
code = "zz"
name = "Test Section"
country = "CH"
timezone = "Europe/Zurich"
languages = ["en", "fr"]
intake_key_env = "DISPATCH_INTAKE_KEY_ZZ"

[sender]
name = "Appeals desk"
address = "appeals@zz.dispatch.example"

[smtp]
host = "smtp.zz.dispatch.example"
username_env = "DISPATCH_SMTP_USER_ZZ"
password_env = "DISPATCH_SMTP_PASSWORD_ZZ"

[targets.consulate]
name = "Consulate of Examples"
country = "CH"
timezone = "Europe/Zurich"
languages = ["en"]
fax = "@FAX_NATIONAL@"
salutation = { en = "Dear Consul," }

[campaigns.UA-900-24]
deadline = 2024-02-20

[[campaigns.UA-900-24.writes]]
target = "minister"
channels = ["fax"]

[[campaigns.UA-900-24.writes]]
target = "office"
channels = ["email"]

[[campaigns.UA-900-24.copies_to]]
target = "consulate"
channels = ["fax"]
"""


class ConfigTree:
    """A throwaway config/ in tmp_path, edited one line at a time by each test."""

    def __init__(self, root: Path):
        self.dir = root / "config"
        self.write(CAMPAIGN_FILE, CAMPAIGN.replace("@FAX_INTL@", FAX_INTL))
        self.write(SECTION_FILE, SECTION.replace("@FAX_NATIONAL@", FAX_NATIONAL))

    def write(self, relative: str, text: str) -> None:
        path = self.dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    def read(self, relative: str) -> str:
        return (self.dir / relative).read_text(encoding="utf-8")

    def edit(self, relative: str, old: str, new: str) -> None:
        text = self.read(relative)
        assert old in text, f"test setup: {old!r} not in {relative}"
        self.write(relative, text.replace(old, new, 1))

    def problems(self, templates: Path | None = None) -> list[ConfigProblem]:
        with pytest.raises(ConfigError) as info:
            load_catalog(self.dir, templates)
        return info.value.problems


@pytest.fixture
def tree(tmp_path: Path) -> ConfigTree:
    return ConfigTree(tmp_path)


def _find(problems: list[ConfigProblem], file: str, key: str) -> ConfigProblem:
    for problem in problems:
        if problem.file == f"config/{file}" and problem.key == key:
            return problem
    raise AssertionError(f"no problem at {file} {key}; got:\n" + "\n".join(map(str, problems)))


def test_the_test_config_itself_is_valid(tree: ConfigTree) -> None:
    catalog = load_catalog(tree.dir)
    consulate = catalog.section("zz").targets["consulate"]
    assert consulate.fax == phonenumbers.format_number(_CH_FAX, phonenumbers.PhoneNumberFormat.E164)
    assert check_environment(catalog, {"DISPATCH_INTAKE_KEY_ZZ": "k"}, live=False) == []


Edit = Callable[[ConfigTree], None]


def _rename_section_file(tree: ConfigTree) -> None:
    tree.write("sections/zy.toml", tree.read(SECTION_FILE))
    (tree.dir / SECTION_FILE).unlink()


def _drop_smtp_table(tree: ConfigTree) -> None:
    text = tree.read(SECTION_FILE)
    start, end = text.index("[smtp]"), text.index("[targets.consulate]")
    tree.write(SECTION_FILE, text[:start] + text[end:])


BROKEN: dict[str, tuple[Edit, str, str, str]] = {
    # name: (edit, file, key, fragment of the message)
    "toml syntax error": (
        lambda t: t.edit(CAMPAIGN_FILE, 'title = "Test action"', 'title = "Test action'),
        CAMPAIGN_FILE,
        "line 3",
        "TOML syntax error",
    ),
    "unknown target in writes": (
        lambda t: t.edit(SECTION_FILE, 'target = "minister"', 'target = "ministre"'),
        SECTION_FILE,
        "campaigns.UA-900-24.writes[0].target",
        "known: minister, office",
    ),
    "email channel on a fax-only target": (
        lambda t: t.edit(SECTION_FILE, 'channels = ["fax"]', 'channels = ["fax", "email"]'),
        SECTION_FILE,
        "campaigns.UA-900-24.writes[0].channels[1]",
        "no email address; it can be reached by: fax",
    ),
    "fax channel on an email-only target": (
        lambda t: t.edit(SECTION_FILE, 'channels = ["email"]', 'channels = ["fax"]'),
        SECTION_FILE,
        "campaigns.UA-900-24.writes[1].channels[0]",
        "no fax number",
    ),
    "invalid fax in a section": (
        lambda t: t.edit(SECTION_FILE, f'fax = "{FAX_NATIONAL}"', 'fax = "021 12"'),
        SECTION_FILE,
        "targets.consulate.fax",
        "not a valid number (read as a CH number)",
    ),
    "invalid fax in a campaign": (
        lambda t: t.edit(CAMPAIGN_FILE, f'fax = "{FAX_INTL}"', 'fax = "fax me"'),
        CAMPAIGN_FILE,
        "targets.minister.fax",
        "cannot be read",
    ),
    "unknown timezone in a section": (
        lambda t: t.edit(SECTION_FILE, 'timezone = "Europe/Zurich"', 'timezone = "Europe/Zurik"'),
        SECTION_FILE,
        "section.timezone",
        "unknown timezone 'Europe/Zurik'",
    ),
    "unknown timezone in a target": (
        lambda t: t.edit(CAMPAIGN_FILE, 'timezone = "Europe/Zurich"', 'timezone = "Mars/Olympus"'),
        CAMPAIGN_FILE,
        "targets.minister.timezone",
        "unknown timezone",
    ),
    "section file named differently from its code": (
        _rename_section_file,
        "sections/zy.toml",
        "section.code",
        "rename the file to zz.toml",
    ),
    "missing required key": (
        lambda t: t.edit(SECTION_FILE, 'name = "Test Section"\n', ""),
        SECTION_FILE,
        "section.name",
        "required key 'name' is missing",
    ),
    "missing required table": (
        lambda t: t.edit(SECTION_FILE, "[sender]", "[sendr]"),
        SECTION_FILE,
        "sender",
        "[sender] table missing",
    ),
    "email routed without a relay": (
        _drop_smtp_table,
        SECTION_FILE,
        "campaigns.UA-900-24.writes[1].channels[0]",
        "this section has no [smtp] table",
    ),
    "a station id telnyx cannot send": (
        lambda t: t.edit(
            SECTION_FILE,
            "[targets.consulate]",
            '[fax]\ngateway = "telnyx"\napi_key_env = "K"\nconnection_id = "c"\nstation_id = "AI ZZ"\n\n'
            "[targets.consulate]",
        ),
        SECTION_FILE,
        "fax.station_id",
        "station_id cannot be used with telnyx",
    ),
    "a relay CA file that is not there": (
        lambda t: t.edit(
            SECTION_FILE,
            'host = "smtp.zz.dispatch.example"',
            'host = "smtp.zz.dispatch.example"\nca_file = "relay-ca.pem"',
        ),
        SECTION_FILE,
        "smtp.ca_file",
        "no such file",
    ),
    "unknown key": (
        lambda t: t.edit(SECTION_FILE, 'languages = ["en"]', 'langauges = ["en"]'),
        SECTION_FILE,
        "targets.consulate.langauges",
        "did you mean 'languages'",
    ),
    "unknown table": (
        lambda t: t.edit(SECTION_FILE, "[sender]", "[sendr]"),
        SECTION_FILE,
        "sendr",
        "did you mean 'sender'",
    ),
    "unknown channel": (
        lambda t: t.edit(SECTION_FILE, 'channels = ["email"]', 'channels = ["pigeon"]'),
        SECTION_FILE,
        "campaigns.UA-900-24.writes[1].channels[0]",
        "no channel 'pigeon' (this service has: email, fax)",
    ),
    "campaign target under copies_to": (
        lambda t: t.edit(SECTION_FILE, 'target = "consulate"', 'target = "office"'),
        SECTION_FILE,
        "campaigns.UA-900-24.copies_to[0].target",
        "list it under writes",
    ),
    "section target shadows a campaign target": (
        lambda t: t.edit(SECTION_FILE, "[targets.consulate]", "[targets.minister]"),
        SECTION_FILE,
        "targets.minister",
        "also a target of campaign UA-900-24",
    ),
    "section joins an unknown campaign": (
        lambda t: t.write(SECTION_FILE, t.read(SECTION_FILE).replace("campaigns.UA-900-24", 'campaigns."UA 901"')),
        SECTION_FILE,
        'campaigns."UA 901"',
        "no campaign 'UA 901'",
    ),
    "duplicate campaign id": (
        lambda t: t.write("campaigns/UA-900-24-copy.toml", t.read(CAMPAIGN_FILE)),
        "campaigns/UA-900-24.toml",
        "campaign.id",
        "already defined in config/campaigns/UA-900-24-copy.toml",
    ),
    "default language without letters": (
        lambda t: t.edit(CAMPAIGN_FILE, 'default_language = "en"', 'default_language = "de"'),
        CAMPAIGN_FILE,
        "campaign.default_language",
        "is not one of letter_languages",
    ),
    "bad language code as a salutation key": (
        lambda t: t.edit(CAMPAIGN_FILE, 'salutation = { en = "Dear Sir', 'salutation = { EN = "Dear Sir'),
        CAMPAIGN_FILE,
        "targets.office.salutation.EN",
        "2 or 3 letter lower-case code",
    ),
    "copy target without a default-language salutation": (
        lambda t: t.edit(SECTION_FILE, 'salutation = { en = "Dear Consul," }', 'salutation = { fr = "Monsieur," }'),
        SECTION_FILE,
        "targets.consulate.salutation",
        "no salutation in 'en'",
    ),
    "credentials without their pair": (
        lambda t: t.edit(SECTION_FILE, 'password_env = "DISPATCH_SMTP_PASSWORD_ZZ"\n', ""),
        SECTION_FILE,
        "smtp.username_env",
        "username_env and password_env go together",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_config_names_file_and_key(tree: ConfigTree, case: str) -> None:
    edit, file, key, fragment = BROKEN[case]
    edit(tree)
    problem = _find(tree.problems(), file, key)
    assert fragment in problem.message


def test_empty_section_file_names_each_missing_table_once(tree: ConfigTree) -> None:
    tree.write(SECTION_FILE, "")
    problems = [p for p in tree.problems() if p.file == f"config/{SECTION_FILE}"]
    assert [(p.key, p.message) for p in problems] == [
        ("section", "[section] table missing"),
        ("sender", "[sender] table missing"),
    ]


def test_a_section_that_only_faxes_needs_no_relay(tree: ConfigTree) -> None:
    _drop_smtp_table(tree)
    tree.edit(SECTION_FILE, 'target = "office"\nchannels = ["email"]', 'target = "minister"\nchannels = ["fax"]')
    tree.edit(
        SECTION_FILE,
        '[[campaigns.UA-900-24.writes]]\ntarget = "minister"\nchannels = ["fax"]\n\n',
        "",
    )
    catalog = load_catalog(tree.dir)
    assert catalog.section("zz").smtp is None
    env = {"DISPATCH_INTAKE_KEY_ZZ": "k"}
    assert check_environment(catalog, env, live=True) == []


def test_live_fax_gateway_needs_the_webhook_address_and_key(tree: ConfigTree) -> None:
    tree.edit(
        SECTION_FILE,
        "[targets.consulate]",
        '[fax]\ngateway = "telnyx"\napi_key_env = "TELNYX_KEY_ZZ"\nconnection_id = "c"\n\n[targets.consulate]',
    )
    catalog = load_catalog(tree.dir)
    env = {"DISPATCH_INTAKE_KEY_ZZ": "k", "DISPATCH_SMTP_USER_ZZ": "u", "DISPATCH_SMTP_PASSWORD_ZZ": "p"}
    env["TELNYX_KEY_ZZ"] = "key"
    assert check_environment(catalog, env, live=False) == []
    problems = check_environment(catalog, env, live=True)
    assert [(p.key, p.message.split(" is ")[0]) for p in problems] == [
        ("fax.gateway", "environment variable DISPATCH_PUBLIC_URL"),
        ("fax.gateway", "environment variable DISPATCH_TELNYX_PUBLIC_KEY"),
    ]


def test_empty_section_table_names_each_missing_key(tree: ConfigTree) -> None:
    text = tree.read(SECTION_FILE)
    tree.write(SECTION_FILE, "[section]\n" + text[text.index("[sender]") :])
    keys = {p.key for p in tree.problems()}
    assert {"section.code", "section.name", "section.country", "section.intake_key_env"} <= keys


def test_syntax_error_line_is_where_the_mistake_is(tree: ConfigTree) -> None:
    tree.edit(SECTION_FILE, 'host = "smtp.zz.dispatch.example"', "host = smtp.zz.dispatch.example")
    line = tree.read(SECTION_FILE).splitlines().index("host = smtp.zz.dispatch.example") + 1
    problems = tree.problems()
    assert [p.key for p in problems if p.file == f"config/{SECTION_FILE}"] == [f"line {line}"]


def test_every_problem_in_one_run_is_reported(tree: ConfigTree) -> None:
    tree.edit(CAMPAIGN_FILE, 'timezone = "Europe/Zurich"', 'timezone = "Mars/Olympus"')
    tree.edit(SECTION_FILE, 'target = "minister"', 'target = "ministre"')
    tree.edit(SECTION_FILE, f'fax = "{FAX_NATIONAL}"', 'fax = "021 12"')
    tree.edit(SECTION_FILE, 'channels = ["email"]', 'channels = ["fax"]')
    tree.edit(SECTION_FILE, 'host = "smtp.zz.dispatch.example"', 'hots = "smtp.zz.dispatch.example"')
    problems = tree.problems()
    reported = {(p.file, p.key) for p in problems}
    assert {
        ("config/campaigns/UA-900-24.toml", "targets.minister.timezone"),
        ("config/sections/zz.toml", "targets.consulate.fax"),
        ("config/sections/zz.toml", "smtp.hots"),
        ("config/sections/zz.toml", "smtp.host"),
    } <= reported
    # Cross-references to a campaign that failed to load are not second-guessed.
    assert not any("no campaign" in p.message for p in problems)


def test_reference_problems_are_reported_alongside_a_bad_value(tree: ConfigTree) -> None:
    tree.edit(SECTION_FILE, f'fax = "{FAX_NATIONAL}"', 'fax = "021 12"')
    tree.edit(SECTION_FILE, 'target = "minister"', 'target = "ministre"')
    tree.edit(SECTION_FILE, 'channels = ["email"]', 'channels = ["fax"]')
    # copies_to still names the consulate, whose fax is now invalid: that is one problem, not two.
    assert {p.key for p in tree.problems()} == {
        "targets.consulate.fax",
        "campaigns.UA-900-24.writes[0].target",
        "campaigns.UA-900-24.writes[1].channels[0]",
    }


def test_every_cross_reference_problem_is_reported(tree: ConfigTree) -> None:
    tree.edit(SECTION_FILE, 'target = "minister"', 'target = "ministre"')
    tree.edit(SECTION_FILE, 'channels = ["email"]', 'channels = ["fax"]')
    tree.edit(SECTION_FILE, 'target = "consulate"', 'target = "embassy"')
    error_keys = {p.key for p in tree.problems()}
    assert error_keys == {
        "campaigns.UA-900-24.writes[0].target",
        "campaigns.UA-900-24.writes[1].channels[0]",
        "campaigns.UA-900-24.copies_to[0].target",
    }


def test_config_error_message_lists_every_problem(tree: ConfigTree) -> None:
    tree.edit(SECTION_FILE, 'target = "minister"', 'target = "ministre"')
    tree.edit(SECTION_FILE, 'channels = ["email"]', 'channels = ["fax"]')
    with pytest.raises(ConfigError) as info:
        load_catalog(tree.dir)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith("config/sections/zz.toml: campaigns.UA-900-24.writes[") for line in lines)


def test_secret_pasted_instead_of_an_env_var_name_is_not_echoed(tree: ConfigTree) -> None:
    secret = "s3cret-intake-key-value"
    tree.edit(SECTION_FILE, '"DISPATCH_INTAKE_KEY_ZZ"', f'"{secret}"')
    problem = _find(tree.problems(), SECTION_FILE, "section.intake_key_env")
    assert "NAME of an environment variable" in problem.message
    assert secret not in problem.message


def test_missing_letter_templates_are_named_by_language(tree: ConfigTree, tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    (templates / "UA-900-24" / "en").mkdir(parents=True)
    problem = _find(tree.problems(templates), CAMPAIGN_FILE, "campaign.letter_languages[1]")
    assert "templates/UA-900-24/fr/" in problem.message
    (templates / "UA-900-24" / "fr").mkdir()
    load_catalog(tree.dir, templates)


def test_missing_sections_directory_is_reported(tree: ConfigTree) -> None:
    (tree.dir / SECTION_FILE).unlink()
    (tree.dir / "sections").rmdir()
    problems = tree.problems()
    assert [p.file for p in problems] == ["config/sections/"]


# --------------------------------------------------------------------------- environment


def test_missing_intake_key_is_named_by_file_and_key(tree: ConfigTree) -> None:
    catalog = load_catalog(tree.dir)
    [problem] = check_environment(catalog, {}, live=False)
    assert (problem.file, problem.key) == ("config/sections/zz.toml", "section.intake_key_env")
    assert "DISPATCH_INTAKE_KEY_ZZ is not set" in problem.message


def test_live_mode_also_needs_relay_credentials_without_leaking_them(tree: ConfigTree) -> None:
    catalog = load_catalog(tree.dir)
    env = {
        "DISPATCH_INTAKE_KEY_ZZ": "   ",
        "DISPATCH_SMTP_USER_ZZ": "relay-user-value",
        "DISPATCH_SMTP_PASSWORD_ZZ": "",
    }
    assert len(check_environment(catalog, env, live=False)) == 1
    problems = check_environment(catalog, env, live=True)
    assert [(p.key, "empty" in p.message) for p in problems] == [
        ("section.intake_key_env", True),
        ("smtp.password_env", True),
    ]
    assert not any("relay-user-value" in str(p) for p in problems)


def test_shipped_config_names_an_intake_key_for_every_section(catalog: Catalog) -> None:
    problems = check_environment(catalog, {}, live=False)
    assert sorted(p.file for p in problems) == [f"config/sections/{c}.toml" for c in ("ca", "ch", "uk", "us")]
    assert {p.key for p in problems} == {"section.intake_key_env"}
    env = {s.intake_key_env: "k" for s in catalog.sections.values()}
    assert check_environment(catalog, env, live=False) == []
