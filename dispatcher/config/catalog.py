"""A loaded, cross-checked configuration: what the rest of the service asks questions of."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo

from dispatcher.config.models import Campaign, Participation, Section, Target

DEMO_SUFFIX = "-DEMO"


@dataclass(frozen=True)
class PlannedRoute:
    """One letter an appeal turns into: a target reached through one channel."""

    target: Target
    channel: str
    #: "campaign" for the UA's own targets, "copy" for a section's copies-to targets
    kind: Literal["campaign", "copy"]


@dataclass(frozen=True)
class Catalog:
    root: Path
    campaigns: Mapping[str, Campaign]
    sections: Mapping[str, Section]
    #: where each campaign and section was read from, for messages that name the file
    sources: Mapping[str, Path] = field(default_factory=dict)

    def campaign(self, campaign_id: str) -> Campaign:
        return self.campaigns[campaign_id]

    def section(self, code: str) -> Section:
        return self.sections[code]

    def participation(self, campaign_id: str, section_code: str) -> Participation:
        return self.sections[section_code].campaigns[campaign_id]

    def routes(self, campaign_id: str, section_code: str) -> list[PlannedRoute]:
        """Every (target, channel) an appeal to ``campaign_id`` through ``section_code`` plans."""
        campaign = self.campaigns[campaign_id]
        section = self.sections[section_code]
        part = section.campaigns[campaign_id]
        planned: list[PlannedRoute] = []
        for route in part.writes:
            for channel in route.channels:
                planned.append(PlannedRoute(campaign.targets[route.target], channel, "campaign"))
        for route in part.copies_to:
            for channel in route.channels:
                planned.append(PlannedRoute(section.targets[route.target], channel, "copy"))
        return planned

    def digest_allowed(self, campaign_id: str, section_code: str, target_id: str) -> bool:
        """Whether the section sends ``target_id`` digests for this campaign when its line is short."""
        section = self.sections.get(section_code)
        part = section.campaigns.get(campaign_id) if section is not None else None
        if part is None:
            return False
        return any(route.digest for route in (*part.writes, *part.copies_to) if route.target == target_id)

    def fallback(self, campaign_id: str, section_code: str, target_id: str, channel: str) -> list[str]:
        """The channels that stand in for ``channel`` on the section's route to ``target_id``, in order."""
        section = self.sections.get(section_code)
        part = section.campaigns.get(campaign_id) if section is not None else None
        if part is None:
            return []
        for route in (*part.writes, *part.copies_to):
            if route.target == target_id and channel in route.channels:
                return list(route.fallback)
        return []

    def target(self, campaign_id: str, section_code: str, target_id: str) -> Target:
        campaign = self.campaigns[campaign_id]
        if target_id in campaign.targets:
            return campaign.targets[target_id]
        return self.sections[section_code].targets[target_id]

    def deadline_at(self, campaign_id: str, section_code: str) -> datetime:
        """The instant action closes: the end of the deadline day in the section's timezone."""
        section = self.sections[section_code]
        day = section.campaigns[campaign_id].deadline or self.campaigns[campaign_id].deadline
        end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=ZoneInfo(section.timezone))
        return end.astimezone(ZoneInfo("UTC"))

    def with_demo_copies(self, today: date) -> Catalog:
        """Add ``<id>-DEMO`` copies of every campaign, issued today, with the original's window.

        UA 002/19's deadline has passed; demos and tests run this copy instead of weakening the
        deadline check. Each section's own deadline keeps its distance from the issue date.
        """
        campaigns = dict(self.campaigns)
        sections = {code: s for code, s in self.sections.items()}
        for cid, campaign in self.campaigns.items():
            if cid.endswith(DEMO_SUFFIX):
                continue
            shift = today - campaign.issued
            demo_id = cid + DEMO_SUFFIX
            campaigns[demo_id] = campaign.model_copy(
                update={
                    "id": demo_id,
                    "issued": today,
                    "deadline": campaign.deadline + shift,
                    "status": "open",
                    "closed_reason": None,
                    "template_set": campaign.templates,
                }
            )
            for code, section in sections.items():
                part = section.campaigns.get(cid)
                if part is None:
                    continue
                demo_part = part.model_copy(update={"deadline": part.deadline + shift if part.deadline else None})
                sections[code] = section.model_copy(update={"campaigns": {**section.campaigns, demo_id: demo_part}})
        return Catalog(self.root, campaigns, sections, dict(self.sources))
