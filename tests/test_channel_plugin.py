"""A channel the service does not ship, registered from this file alone: postal letters handed
to a print-and-mail house. An appeal goes through it end to end (config validation, intake, the
sending gate's caps, the worker, the ledger), with no edit under dispatcher/ — the proof that
channels are plug-ins. docs/adding-a-channel.md walks through the same channel."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from dispatcher.app import Service
from dispatcher.channels.base import BaseChannel, Outgoing, Report, Status
from dispatcher.channels.builtin import builtin_channels
from dispatcher.config.loader import load_catalog
from dispatcher.config.models import Target
from dispatcher.errors import ConfigError
from dispatcher.settings import Settings
from tests.conftest import ROOT, Running, make_settings, wait_for
from tests.support.liveconfig import write_config
from tests.support.services import free_port

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@dataclass
class Posted:
    recipient: str
    tag: str
    text: str
    service: str


class PrintHouse:
    """Stands in for a print-and-mail API: keeps what it is asked to post."""

    def __init__(self) -> None:
        self.letters: list[Posted] = []
        self.lock = threading.Lock()


class PostSettings(BaseModel):
    """A section's ``[channels.post]`` table."""

    model_config = ConfigDict(extra="forbid")
    #: the print house's product: how the letter is posted
    service: Literal["first_class", "standard"] = "first_class"
    return_address: str = Field(min_length=1)


class PostChannel(BaseChannel):
    name: ClassVar[str] = "post"
    # the printed letter is the text of the model letter, as an email's body
    document: ClassVar[str] = "email"
    address_noun: ClassVar[str] = "postal address"
    config_model: ClassVar[type[BaseModel] | None] = PostSettings

    def __init__(self, settings: Settings, house: PrintHouse):
        super().__init__(settings)
        self.house = house

    @staticmethod
    def address_of(target: Target) -> str | None:
        return target.addresses.get("post")

    @staticmethod
    def default_limits(settings: Settings) -> tuple[str, ...]:
        return ("2/hour",)

    async def deliver(self, letter: Outgoing) -> Report:
        settings = self.section_config(letter.section)
        assert isinstance(settings, PostSettings)
        with self.house.lock:
            self.house.letters.append(Posted(letter.recipient, letter.tag, letter.document.text, settings.service))
            job = f"job-{len(self.house.letters)}"
        return Report(Status.ACCEPTED, job, tag=letter.tag, code=201, text="queued for printing")


POST_TABLE = '[smtp]\nhost = "127.0.0.1"\n\n[channels.post]\nservice = "standard"\nreturn_address = "Test Section"\n'


def post_config(tmp_path, table: str = POST_TABLE):
    return write_config(
        tmp_path,
        campaign_id="TEST-POST",
        channel="post",
        address_line='addresses = { post = "Ministry of Examples, 1 Example Street, London" }',
        relay_and_gateway=table,
    )


def post_service(tmp_path, database_url, redis_server, house: PrintHouse) -> Service:
    config = post_config(tmp_path)
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_server.url, smtp_port=free_port()
    ).but(demo_campaigns=False, config_dir=config, templates_dir=ROOT / "templates")
    service = Service(
        settings,
        environ={"DISPATCH_INTAKE_KEY_ZZ": "k"},
        plugins=[(PostChannel, lambda: PostChannel(settings, house))],
    )
    service.ledger.migrate()
    return service


def submit(service: Service, n: int) -> str:
    accepted = service.intake.submit(
        {
            "campaign": "TEST-POST",
            "section": "zz",
            "language": "en",
            "supporter": {"name": f"Jane Doe {n}", "email": f"jane{n}@example.org", "country": "GB"},
            "message": "Please release him.",
        }
    )
    [planned] = accepted.deliveries
    assert planned.channel == "post"
    return planned.id


@SQLITE
def test_an_appeal_goes_out_through_a_channel_registered_by_the_tests(tmp_path, database_url, redis_server):
    house = PrintHouse()
    service = post_service(tmp_path, database_url, redis_server, house)
    with Running(service):
        ids = [submit(service, n) for n in range(3)]

        def states() -> list[tuple[str | None, str | None]]:
            views = [service.ledger.views.delivery(i) for i in ids]
            return sorted((v.state.value, v.last_outcome) for v in views if v is not None)

        # its own caps hold it: 2 an hour to one address, across every campaign
        wait_for(lambda: states() == [("planned", "deferred"), ("sent", "sent"), ("sent", "sent")], timeout=30)
    assert len(house.letters) == 2 and {p.tag for p in house.letters} < set(ids)
    posted = house.letters[0]
    assert posted.recipient == "Ministry of Examples, 1 Example Street, London"
    assert "Please release him." in posted.text and "Jane Doe" in posted.text
    assert posted.service == "standard"  # the section's own [channels.post] table
    view = service.ledger.views.delivery(posted.tag)
    assert view is not None and view.remote_id in ("job-1", "job-2") and view.last_code == "201"
    [held] = [service.ledger.views.delivery(i) for i in ids if i not in {p.tag for p in house.letters}]
    assert held is not None and "2/hour" in (held.last_text or "")
    # nothing was sent by any other channel
    assert list((tmp_path / "var" / "sandbox" / "mail").glob("*")) == []
    # `sent` settles at once for a channel that learns nothing later: the retention purge may run
    assert service.channels.sent_final_after()["post"] == timedelta(0)


def test_config_naming_the_channel_is_refused_where_it_is_not_registered(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_catalog(post_config(tmp_path), ROOT / "templates")
    [writes, table, address] = sorted(raised.value.problems, key=lambda p: p.key)
    assert (writes.file, writes.key) == ("config/sections/zz.toml", "campaigns.TEST-POST.writes[0].channels[0]")
    assert "no channel 'post' (this service has: email, fax)" in writes.message
    assert (table.file, table.key) == ("config/sections/zz.toml", "channels.post")
    assert (address.file, address.key) == ("config/campaigns/TEST-POST.toml", "targets.minister.addresses.post")


def test_the_channels_own_settings_are_checked_by_its_model(tmp_path):
    channels = builtin_channels().register(PostChannel)
    broken = POST_TABLE.replace('service = "standard"', 'service = "pigeon"').replace(
        'return_address = "Test Section"', ""
    )
    with pytest.raises(ConfigError) as raised:
        load_catalog(post_config(tmp_path, broken), ROOT / "templates", channels=channels)
    problems = {(p.file, p.key) for p in raised.value.problems}
    assert problems == {
        ("config/sections/zz.toml", "channels.post.service"),
        ("config/sections/zz.toml", "channels.post.return_address"),
    }
