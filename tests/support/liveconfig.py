"""Config for live-mode tests: a campaign with one fictional target and a section ``zz``, written
to a temporary config dir. Real offices never appear here; live mode never sees the seeds."""

from __future__ import annotations

from pathlib import Path

_CAMPAIGN = """
[campaign]
id = "{campaign_id}"
title = "A test campaign with a fictional target"
ai_index = "TEST 00/0000/2026"
issued = 2026-01-01
deadline = 2099-12-31
preferred_languages = ["en"]
letter_languages = ["en", "ru", "de", "fr"]
default_language = "en"
template_set = "UA-002-19"

[targets.minister]
name = "A. Minister"
title = "Minister of Examples"
country = "GB"
timezone = "Europe/London"
languages = ["en"]
{address_line}

[targets.minister.salutation]
en = "Dear Minister,"
"""

_SECTION_HEAD = """
[section]
code = "zz"
name = "Test Section"
country = "GB"
timezone = "Europe/London"
languages = ["en"]
intake_key_env = "DISPATCH_INTAKE_KEY_ZZ"

[sender]
name = "Test Section"
address = "ua@zz.dispatch.example"
"""

_SECTION_TAIL = """
[campaigns.{campaign_id}]

[[campaigns.{campaign_id}.writes]]
target = "minister"
channels = ["{channel}"]
"""


def write_config(tmp_path: Path, *, campaign_id: str, channel: str, address_line: str, relay_and_gateway: str) -> Path:
    """A config dir with campaign ``campaign_id`` whose one target is reached through ``channel``;
    ``address_line`` gives the target's email or fax, ``relay_and_gateway`` the section's
    ``[smtp]`` (and ``[fax]``) tables."""
    config = tmp_path / "config"
    (config / "campaigns").mkdir(parents=True)
    (config / "sections").mkdir()
    (config / "campaigns" / f"{campaign_id}.toml").write_text(
        _CAMPAIGN.format(campaign_id=campaign_id, address_line=address_line)
    )
    (config / "sections" / "zz.toml").write_text(
        _SECTION_HEAD + relay_and_gateway + _SECTION_TAIL.format(campaign_id=campaign_id, channel=channel)
    )
    return config
