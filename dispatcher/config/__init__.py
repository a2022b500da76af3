"""Configuration: campaigns, targets and sections, read from config/ and cross-checked."""

from dispatcher.config.catalog import DEMO_SUFFIX, Catalog, PlannedRoute
from dispatcher.config.loader import check_environment, load_catalog
from dispatcher.config.models import (
    CHANNELS,
    Campaign,
    Channel,
    Participation,
    Route,
    Section,
    Sender,
    SmtpRelay,
    Target,
)

__all__ = [
    "CHANNELS",
    "DEMO_SUFFIX",
    "Campaign",
    "Catalog",
    "Channel",
    "Participation",
    "PlannedRoute",
    "Route",
    "Section",
    "Sender",
    "SmtpRelay",
    "Target",
    "check_environment",
    "load_catalog",
]
