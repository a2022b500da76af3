"""Read config/ into a :class:`Catalog`, or say everything that is wrong with it.

Layout (one file per campaign, one per section)::

    config/campaigns/UA-002-19.toml   [campaign]  +  [targets.<id>]
    config/sections/us.toml           [section] [sender] [smtp]  +  [targets.<id>]
                                      + [campaigns.<campaign id>] with [[...writes]], [[...copies_to]]

Section admins edit these files by hand, so a failed load lists every problem at once, each with
the file and the dotted TOML key as the admin wrote it (``campaigns.UA-002-19.writes[0].target``),
rather than stopping at the first one.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from dispatcher.channels.builtin import builtin_channels
from dispatcher.channels.email.dkim import key_problems
from dispatcher.channels.registry import Channels
from dispatcher.config import models
from dispatcher.config.catalog import DEMO_SUFFIX, Catalog
from dispatcher.config.models import Campaign, Participation, Route, Section, Target
from dispatcher.errors import ConfigError, ConfigProblem

__all__ = ["check_environment", "load_catalog"]

Loc = tuple[str | int, ...]

#: key of problems that concern a whole file or directory rather than one TOML key
WHOLE_FILE = "(file)"


@dataclass(frozen=True)
class _Layout:
    """How a model's fields are spread over a file's top-level tables.

    The root table (``[campaign]``, ``[section]``) holds the model's own scalar fields; each name
    in ``tables`` is a top-level table holding the model field of the same name.
    """

    model: type[BaseModel]
    root: str
    id_key: str
    tables: tuple[str, ...]


_CAMPAIGN = _Layout(Campaign, "campaign", "id", ("targets",))
_SECTION = _Layout(
    Section,
    "section",
    "code",
    ("sender", "smtp", "dkim", "fax", "bounces", "intake", "web", "channels", "targets", "campaigns"),
)


@dataclass(frozen=True)
class _File:
    path: Path
    #: the path as problems show it, relative to config/'s parent
    shown: str
    data: dict[str, Any]

    def raw_id(self, layout: _Layout) -> str | None:
        """The id/code as written, even when the file does not validate."""
        root = self.data.get(layout.root)
        value = root.get(layout.id_key) if isinstance(root, dict) else None
        return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- public API


def load_catalog(config_dir: Path, templates_dir: Path | None = None, *, channels: Channels | None = None) -> Catalog:
    """Load and cross-check ``config_dir``; raise :class:`ConfigError` listing every problem.

    With ``templates_dir``, also check that every letter language of every campaign has its
    folder ``templates_dir/<campaign.templates>/<lang>/``. Every channel a file names must be
    one of ``channels`` (default: the shipped ones) and reach its target.
    """
    channels = builtin_channels() if channels is None else channels
    config_dir = Path(config_dir).resolve()
    problems: list[ConfigProblem] = []
    campaign_files = _read_dir(config_dir / "campaigns", config_dir.parent, "campaign", problems)
    section_files = _read_dir(config_dir / "sections", config_dir.parent, "section", problems)

    _check_ids(campaign_files, _CAMPAIGN, problems)
    _check_ids(section_files, _SECTION, problems)
    for file in section_files:
        code = file.raw_id(_SECTION)
        if code is not None and code != file.path.stem:
            problems.append(
                ConfigProblem(
                    file.shown,
                    "section.code",
                    f"the file is named {file.path.name} but the code is {code!r}: "
                    f"rename the file to {code}.toml or set code = {file.path.stem!r}",
                )
            )

    campaigns = _load_campaigns(campaign_files, problems)
    sections, parts = _load_sections(section_files, problems)
    # Campaigns that exist but failed validation are already reported; sections naming them
    # should not add a misleading "unknown campaign".
    known_ids = {cid for f in campaign_files if (cid := f.raw_id(_CAMPAIGN)) is not None}

    for file, campaign in campaigns.values():
        problems.extend(_check_campaign(file, campaign, channels))
    problems.extend(_check_sections(parts, campaigns, known_ids, channels))
    if templates_dir is not None:
        for file, campaign in campaigns.values():
            problems.extend(_check_templates(file, campaign, Path(templates_dir).resolve()))

    if problems:
        # Grouped by file (stable, so each file's problems keep their order) for the admin
        # who fixes one file at a time.
        raise ConfigError(sorted(problems, key=lambda p: p.file))
    sources = {cid: f.path for cid, (f, _) in campaigns.items()}
    sources.update({code: f.path for code, (f, _) in sections.items()})
    return Catalog(
        root=config_dir,
        campaigns={cid: c for cid, (_, c) in campaigns.items()},
        sections={code: s for code, (_, s) in sections.items()},
        sources=sources,
    )


def check_environment(
    catalog: Catalog, environ: Mapping[str, str], *, live: bool, channels: Channels | None = None
) -> list[ConfigProblem]:
    """Name every environment variable the catalog relies on that is unset or empty.

    Intake keys are always needed (an appeal cannot be authenticated without one); relay
    credentials only in live mode, because sandbox mode never talks to the sections' relays.
    A section's DKIM keys are read in both modes (sandbox mode signs too): a key file that is
    missing, unreadable or not a key of its type, and an unset key variable, are problems.
    Messages name variables and files, never their values.
    """
    channels = builtin_channels() if channels is None else channels
    problems: list[ConfigProblem] = []
    for code, section in sorted(catalog.sections.items()):
        shown = _section_file_shown(catalog, code)
        needed = [("section.intake_key_env", section.intake_key_env, "the section's intake key")]
        for kind in channels:
            needed += [(s.key, s.env, s.what) for s in kind.secrets(section, live=live)]
        for key, var, what in needed:
            value = environ.get(var)
            if value is None or not value.strip():
                state = "not set" if value is None else "empty"
                problems.append(ConfigProblem(shown, key, f"environment variable {var} is {state}; set it to {what}"))
        problems.extend(key_problems(section, catalog.root, environ, shown=shown))
    return problems


def _section_file_shown(catalog: Catalog, code: str) -> str:
    path = catalog.sources.get(code)
    if path is None:
        return f"{catalog.root.name}/sections/{code}.toml"
    return _shown(path, catalog.root.parent)


# --------------------------------------------------------------------------- reading files


def _shown(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _read_dir(directory: Path, base: Path, kind: str, problems: list[ConfigProblem]) -> list[_File]:
    shown = _shown(directory, base) + "/"
    if not directory.is_dir():
        problems.append(ConfigProblem(shown, WHOLE_FILE, f"directory missing: one .toml file per {kind} goes here"))
        return []
    files: list[_File] = []
    for path in sorted(directory.glob("*.toml")):
        data = _read_toml(path, _shown(path, base), problems)
        if data is not None:
            files.append(_File(path, _shown(path, base), data))
    if not files and not any(p.file.startswith(shown) for p in problems):
        problems.append(ConfigProblem(shown, WHOLE_FILE, f"no {kind} files (*.toml) found"))
    return files


_TOML_WHERE = re.compile(r"\s*\(at (?:line (?P<line>\d+), column (?P<col>\d+)|end of document)\)$")


def _read_toml(path: Path, shown: str, problems: list[ConfigProblem]) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        text = str(exc)
        where = _TOML_WHERE.search(text)
        message = text[: where.start()] if where else text
        if where and where["line"]:
            key = f"line {where['line']}"
            message += f" (column {where['col']})"
        else:
            key = "end of file"
        problems.append(ConfigProblem(shown, key, f"TOML syntax error: {message}"))
    except UnicodeDecodeError:
        problems.append(ConfigProblem(shown, WHOLE_FILE, "not UTF-8 text; save the file as UTF-8"))
    except OSError as exc:
        problems.append(ConfigProblem(shown, WHOLE_FILE, f"cannot be read: {exc.strerror}"))
    return None


def _check_ids(files: Sequence[_File], layout: _Layout, problems: list[ConfigProblem]) -> None:
    first: dict[str, _File] = {}
    for file in files:
        ident = file.raw_id(layout)
        if ident is None:
            continue
        if ident in first:
            problems.append(
                ConfigProblem(
                    file.shown,
                    f"{layout.root}.{layout.id_key}",
                    f"{ident!r} is already defined in {first[ident].shown}",
                )
            )
        else:
            first[ident] = file


# --------------------------------------------------------------------------- model validation


@dataclass(frozen=True)
class _SectionParts:
    """What the cross-checks need from a section file, even when the file as a whole is invalid.

    An admin who mistyped one fax number should also learn, in the same run, that a writes entry
    names an unknown target; so an invalid file still contributes the targets and campaign
    entries that validate on their own.
    """

    file: _File
    code: str | None
    intake_key_env: str | None
    targets: Mapping[str, Target]
    campaigns: Mapping[str, Participation]
    #: every target id the file defines, valid or not (invalid ones are reported already)
    target_ids: frozenset[str]
    #: every campaign the file takes part in, valid entry or not
    campaign_ids: frozenset[str]
    #: ``[channels.<name>]`` tables, for their channels to validate
    channel_tables: Mapping[str, Any]
    #: the section, when the file validated (what its channels need of it is checked then)
    section: Section | None = None

    @classmethod
    def of(cls, file: _File, section: Section) -> _SectionParts:
        targets, campaigns = section.targets, section.campaigns
        return cls(
            file,
            section.code,
            section.intake_key_env,
            targets,
            campaigns,
            frozenset(targets),
            frozenset(campaigns),
            section.channels,
            section,
        )

    @classmethod
    def salvage(cls, file: _File, data: dict[str, Any]) -> _SectionParts:
        context = {"region": _region(file, _SECTION)}
        raw_targets = data.get("targets")
        code, env = data.get("code"), data.get("intake_key_env")
        return cls(
            file,
            code if isinstance(code, str) else None,
            # Only a well-formed name: the value may be a pasted secret, and messages quote it.
            env if isinstance(env, str) and _ENV_NAME.fullmatch(env) else None,
            _each_valid(raw_targets, Target, context),
            _each_valid(data.get("campaigns"), Participation, context),
            _keys(raw_targets),
            _keys(data.get("campaigns")),
            {k: v for k, v in (data.get("channels") or {}).items() if isinstance(v, dict)}
            if isinstance(data.get("channels"), dict)
            else {},
        )


def _keys(table: Any) -> frozenset[str]:
    return frozenset(table) if isinstance(table, dict) else frozenset()


_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def _each_valid(table: Any, model: type[BaseModel], context: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(table, dict):
        return {}
    valid: dict[str, Any] = {}
    for key, value in table.items():
        try:
            valid[key] = model.model_validate(value, context=context)
        except ValidationError:
            continue  # reported by the whole-file validation
    return valid


def _load_campaigns(files: Sequence[_File], problems: list[ConfigProblem]) -> dict[str, tuple[_File, Campaign]]:
    """Valid campaigns by id; the first file wins (duplicates are reported already)."""
    campaigns: dict[str, tuple[_File, Campaign]] = {}
    for file in files:
        campaign, _ = _validate(file, _CAMPAIGN, problems)
        if campaign is not None:
            campaigns.setdefault(campaign.id, (file, campaign))
    return campaigns


def _load_sections(
    files: Sequence[_File], problems: list[ConfigProblem]
) -> tuple[dict[str, tuple[_File, Section]], list[_SectionParts]]:
    """Valid sections by code, and the cross-checkable parts of every section file."""
    sections: dict[str, tuple[_File, Section]] = {}
    parts: list[_SectionParts] = []
    for file in files:
        section, data = _validate(file, _SECTION, problems)
        if section is not None:
            sections.setdefault(section.code, (file, section))
            parts.append(_SectionParts.of(file, section))
        else:
            parts.append(_SectionParts.salvage(file, data))
    return sections, parts


def _validate(file: _File, layout: _Layout, problems: list[ConfigProblem]) -> tuple[Any, dict[str, Any]]:
    """The file's model (None if invalid, its problems appended) and the model input built."""
    data, root_missing = _reshape(file, layout, problems)
    try:
        return layout.model.model_validate(data, context={"region": _region(file, layout)}), data
    except ValidationError as exc:
        problems.extend(_explain(exc, file.shown, layout, root_missing))
        return None, data


def _region(file: _File, layout: _Layout) -> str | None:
    """Region for national fax formats: a section's country; None lets targets use their own."""
    root = file.data.get(layout.root)
    if layout is not _SECTION or not isinstance(root, dict):
        return None
    country = root.get("country")
    return country if isinstance(country, str) and re.fullmatch(r"[A-Z]{2}", country) else None


def _reshape(file: _File, layout: _Layout, problems: list[ConfigProblem]) -> tuple[dict[str, Any], bool]:
    """Turn the file's tables into the model's input; report what cannot be placed.

    Returns the model input and whether the root table was missing (its fields' "missing"
    errors are then noise next to the one "missing [section] table" problem).
    """
    allowed = (layout.root, *layout.tables)
    for key in file.data:
        if key not in allowed:
            problems.append(ConfigProblem(file.shown, _dotted([key]), _unknown(key, allowed, "table")))

    root = file.data.get(layout.root)
    root_missing = not isinstance(root, dict)
    if not isinstance(root, dict):
        what = "missing" if root is None else "must be a table"
        problems.append(ConfigProblem(file.shown, layout.root, f"[{layout.root}] table {what}"))
        root = {}
    merged: dict[str, Any] = {}
    for key, value in root.items():
        if key in layout.tables:
            problems.append(ConfigProblem(file.shown, _dotted([layout.root, key]), f"belongs in its own [{key}] table"))
        else:
            merged[key] = value
    for table in layout.tables:
        if table in file.data:
            merged[table] = file.data[table]
    if isinstance(merged.get("targets"), dict):
        merged["targets"] = _targets_with_ids(file, merged["targets"], problems)
    return merged, root_missing


def _targets_with_ids(file: _File, targets: dict[str, Any], problems: list[ConfigProblem]) -> dict[str, Any]:
    """The table name is the target's id; an explicit ``id`` may only repeat it."""
    out: dict[str, Any] = {}
    for tid, table in targets.items():
        if isinstance(table, dict):
            if "id" in table and table["id"] != tid:
                problems.append(
                    ConfigProblem(
                        file.shown,
                        _dotted(["targets", tid, "id"]),
                        f"differs from the table name {tid!r}; leave id out, the table name is the id",
                    )
                )
            table = {**table, "id": tid}
        out[tid] = table
    return out


def _explain(exc: ValidationError, shown: str, layout: _Layout, root_missing: bool) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for error in exc.errors(include_url=False):
        loc = _refine_loc(tuple(error["loc"]), error, layout.model)
        in_root = not loc or loc[0] not in layout.tables
        if root_missing and in_root and error["type"] == "missing":
            continue
        problems.append(ConfigProblem(shown, _toml_key(loc, layout), _message(loc, error, layout)))
    return problems


def _refine_loc(loc: Loc, error: ErrorDetails, root: type[BaseModel]) -> Loc:
    """Point a model-level error at the field its message starts with.

    Cross-field checks in models.py raise at the model ("default_language 'xx' is not one of
    letter_languages"); naming the key the admin has to change is more useful than the table.
    """
    model = _model_at(root, loc)
    if error["type"] != "value_error" or model is None:
        return loc
    first = _plain_message(error).split(" ", 1)[0]
    return (*loc, first) if first in model.model_fields else loc


def _toml_key(loc: Loc, layout: _Layout) -> str:
    parts: list[str | int] = [p for p in loc if p != "[key]"]
    if not parts or parts[0] not in layout.tables:
        parts.insert(0, layout.root)
    return _dotted(parts)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _dotted(parts: Sequence[str | int]) -> str:
    """Render a key path the way TOML writes it: a.b."needs quotes".c[0]."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        segment = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
        out += f".{segment}" if out else segment
    return out


# --------------------------------------------------------------------------- messages


def _pattern_of(alias: Any) -> str | None:
    for meta in get_args(alias)[1:]:
        for item in getattr(meta, "metadata", []):
            if getattr(item, "pattern", None):
                return str(item.pattern)
    return None


# Pydantic reports a regex; admins need to know what to write instead.
_PATTERN_HINTS = {
    _pattern_of(models.Slug): "an id uses letters, digits, '.', '_' and '-' only (at most 64), "
    "e.g. 'UA-002-19' or 'embassy-ru'",
    _pattern_of(models.LanguageCode): "a language is a 2 or 3 letter lower-case code, e.g. 'en', 'ru'",
    _pattern_of(models.CountryCode): "a country is a 2 letter upper-case ISO code, e.g. 'CH', 'US'",
    _pattern_of(models.DkimSelector): "a selector is a DNS label (letters, digits, '-', '_'; labels joined "
    "by '.'), e.g. 'rsa-2024'",
    # Never echo the value here: an admin may have pasted the secret instead of its name.
    _pattern_of(models.EnvVarName): "must be the NAME of an environment variable (A-Z, 0-9, _), "
    "e.g. 'DISPATCH_INTAKE_KEY_US', never the secret itself",
}


def _plain_message(error: ErrorDetails) -> str:
    msg = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def _message(loc: Loc, error: ErrorDetails, layout: _Layout) -> str:
    kind = error["type"]
    if kind == "missing":
        if len(loc) == 1 and loc[0] in layout.tables:
            return f"[{loc[0]}] table missing"
        return f"required key {loc[-1]!r} is missing"
    if kind == "extra_forbidden":
        return _unknown(str(loc[-1]), _allowed_keys(layout, loc[:-1]), "key")
    if kind == "string_pattern_mismatch":
        message = _PATTERN_HINTS.get(str((error.get("ctx") or {}).get("pattern")), error["msg"])
    else:
        message = _plain_message(error)
    if loc and loc[-1] == "[key]":
        return f"{loc[-2]!r} cannot be used as a key here: {message}"
    return message


def _unknown(name: str, allowed: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
    return f"unknown {what} {name!r}; {hint}"


def _allowed_keys(layout: _Layout, loc: Loc) -> list[str]:
    model = _model_at(layout.model, loc)
    if model is None:
        return []
    keys = [k for k in model.model_fields if not (model is layout.model and k in layout.tables)]
    # Target ids come from their table names; don't suggest writing them.
    return [k for k in keys if not (model is Target and k == "id")]


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional so containers and models show through."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else tp
    return tp


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class validating the value at ``loc`` (dict keys and list indexes skipped)."""
    tp: Any = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if not isinstance(part, str) or part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif get_origin(tp) in (dict, list):
            tp = get_args(tp)[-1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


# --------------------------------------------------------------------------- cross-checks


def _check_campaign(file: _File, campaign: Campaign, channels: Channels) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = _check_limits(file, campaign.targets, channels)
    if campaign.id.endswith(DEMO_SUFFIX):
        problems.append(
            ConfigProblem(
                file.shown,
                "campaign.id",
                f"ids ending in {DEMO_SUFFIX!r} are reserved for the demo copies the service makes itself",
            )
        )
    for tid, target in campaign.targets.items():
        problem = _salutation_problem(file, tid, target, campaign)
        if problem:
            problems.append(problem)
    return problems


def _salutation_problem(file: _File, tid: str, target: Target, campaign: Campaign) -> ConfigProblem | None:
    # Letters fall back to the default language's salutation, so it must exist.
    if campaign.default_language in target.salutation:
        return None
    return ConfigProblem(
        file.shown,
        _dotted(["targets", tid, "salutation"]),
        f"no salutation in {campaign.default_language!r}, the default language of campaign "
        f"{campaign.id} (letters in other languages fall back to it)",
    )


def _check_sections(
    sections: Sequence[_SectionParts],
    campaigns: Mapping[str, tuple[_File, Campaign]],
    known_ids: set[str],
    channels: Channels,
) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    key_users: dict[str, str] = {}
    for section in sections:
        shown = section.file.shown
        problems.extend(_check_limits(section.file, section.targets, channels))
        problems.extend(_check_channel_tables(section, channels))
        problems.extend(_check_relay_files(section))
        # A shared intake key would let one section's form post appeals as another section.
        if section.intake_key_env is not None:
            other = key_users.setdefault(section.intake_key_env, shown)
            if other != shown:
                problems.append(
                    ConfigProblem(
                        shown,
                        "section.intake_key_env",
                        f"{section.intake_key_env} is also the intake key of {other}; each section needs its own",
                    )
                )
        if section.code in campaigns:
            problems.append(
                ConfigProblem(shown, "section.code", f"{section.code!r} is also a campaign id; pick another code")
            )
        for cid in sorted(section.campaign_ids):
            if cid in campaigns:
                if cid in section.campaigns:
                    problems.extend(_check_participation(section, campaigns[cid][1], channels))
            elif cid not in known_ids:
                known = ", ".join(sorted(known_ids)) or "none"
                problems.append(
                    ConfigProblem(
                        shown, _dotted(["campaigns", cid]), f"no campaign {cid!r} in config/campaigns/ (known: {known})"
                    )
                )
    return problems


def _check_participation(section: _SectionParts, campaign: Campaign, channels: Channels) -> list[ConfigProblem]:
    file, cid = section.file, campaign.id
    part = section.campaigns[cid]
    problems: list[ConfigProblem] = []
    if part.deadline is not None and part.deadline < campaign.issued:
        problems.append(
            ConfigProblem(
                file.shown,
                _dotted(["campaigns", cid, "deadline"]),
                f"{part.deadline} is before the campaign was issued ({campaign.issued})",
            )
        )
    for tid in sorted(section.target_ids & campaign.targets.keys()):
        problems.append(
            ConfigProblem(
                file.shown,
                _dotted(["targets", tid]),
                f"{tid!r} is also a target of campaign {cid}; give this section's target another id",
            )
        )
    campaign_pool = _Pool(campaign.targets, frozenset(campaign.targets))
    section_pool = _Pool(section.targets, section.target_ids)
    problems += _check_routes(file, cid, "writes", part.writes, campaign_pool, section_pool, channels, section.section)
    problems += _check_routes(
        file, cid, "copies_to", part.copies_to, section_pool, campaign_pool, channels, section.section
    )
    for tid in dict.fromkeys(r.target for r in part.copies_to):
        target = section.targets.get(tid)
        problem = target and _salutation_problem(file, tid, target, campaign)
        if problem:
            problems.append(problem)
    return problems


@dataclass(frozen=True)
class _Pool:
    """Targets a route may name: the valid ones, and the ids of all (invalid ones included)."""

    valid: Mapping[str, Target]
    ids: frozenset[str]


def _check_limits(file: _File, targets: Mapping[str, Target], channels: Channels) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for tid, target in targets.items():
        for channel in target.limits:
            if channel not in channels:
                problems.append(
                    ConfigProblem(
                        file.shown, _dotted(["targets", tid, "limits", channel]), _unknown_channel(channel, channels)
                    )
                )
        for channel in target.addresses:
            if channel not in channels:
                problems.append(
                    ConfigProblem(
                        file.shown, _dotted(["targets", tid, "addresses", channel]), _unknown_channel(channel, channels)
                    )
                )
    return problems


def _check_channel_tables(section: _SectionParts, channels: Channels) -> list[ConfigProblem]:
    """Each ``[channels.<name>]`` table is a registered channel's, and valid by its own model."""
    problems: list[ConfigProblem] = []
    for name, table in section.channel_tables.items():
        if name not in channels:
            problems.append(
                ConfigProblem(section.file.shown, _dotted(["channels", name]), _unknown_channel(name, channels))
            )
            continue
        model = channels.kind(name).config_model
        if model is None:
            problems.append(
                ConfigProblem(
                    section.file.shown, _dotted(["channels", name]), f"the {name} channel takes no settings here"
                )
            )
            continue
        try:
            model.model_validate(table)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                key = _dotted(["channels", name, *error["loc"]])
                problems.append(ConfigProblem(section.file.shown, key, _plain_message(error)))
    return problems


def _unknown_channel(name: str, channels: Channels) -> str:
    return f"no channel {name!r} (this service has: {', '.join(channels.names())})"


def _check_routes(
    file: _File,
    cid: str,
    kind: str,
    routes: Sequence[Route],
    pool: _Pool,
    elsewhere: _Pool,
    channels: Channels,
    section: Section | None = None,
) -> list[ConfigProblem]:
    """Routes must name a target of the right pool, once, through channels it can receive and
    the section is set up for (``section``: None when its file did not validate)."""
    problems: list[ConfigProblem] = []
    first_at: dict[str, int] = {}
    for i, route in enumerate(routes):
        key: list[str | int] = ["campaigns", cid, kind, i]
        if route.target in first_at:
            problems.append(
                ConfigProblem(
                    file.shown,
                    _dotted([*key, "target"]),
                    f"{route.target!r} is already listed at {kind}[{first_at[route.target]}]; "
                    "list each target once with all its channels",
                )
            )
            continue
        first_at[route.target] = i
        target = pool.valid.get(route.target)
        if target is None:
            if route.target not in pool.ids:
                message = _unknown_target(route.target, kind, cid, pool.ids, elsewhere.ids)
                problems.append(ConfigProblem(file.shown, _dotted([*key, "target"]), message))
            continue
        for j, channel in enumerate(route.channels):
            if channel not in channels:
                problems.append(
                    ConfigProblem(file.shown, _dotted([*key, "channels", j]), _unknown_channel(channel, channels))
                )
            elif channels.address_of(target, channel) is None:
                problems.append(
                    ConfigProblem(file.shown, _dotted([*key, "channels", j]), _unreachable(target, channel, channels))
                )
            elif section is not None and (missing := channels.kind(channel).missing_settings(section, live=False)):
                problems.append(ConfigProblem(file.shown, _dotted([*key, "channels", j]), missing.message))
        for j, channel in enumerate(route.fallback):
            where = _dotted([*key, "fallback", j])
            if channel not in channels:
                problems.append(ConfigProblem(file.shown, where, _unknown_channel(channel, channels)))
            elif channel in route.channels:
                problems.append(
                    ConfigProblem(
                        file.shown,
                        where,
                        f"{channel!r} is already one of the route's channels: every appeal sends by it, "
                        "so it cannot also stand in for another (one letter per target and channel)",
                    )
                )
            elif channels.address_of(target, channel) is None:
                problems.append(ConfigProblem(file.shown, where, _unreachable(target, channel, channels)))
            elif section is not None and (missing := channels.kind(channel).missing_settings(section, live=False)):
                problems.append(ConfigProblem(file.shown, where, missing.message))
    return problems


def _check_relay_files(section: _SectionParts) -> list[ConfigProblem]:
    """``[smtp] ca_file`` exists: found missing at load, not at the first letter of the day."""
    relay = section.section.smtp if section.section is not None else None
    if relay is None or relay.ca_file is None:
        return []
    path = Path(relay.ca_file)
    if not path.is_absolute():
        path = section.file.path.parent.parent / path  # relative to config/
    if path.is_file():
        return []
    return [
        ConfigProblem(
            section.file.shown,
            "smtp.ca_file",
            f"no such file: {path} (a PEM file of the CAs to trust, relative to config/ unless absolute)",
        )
    ]


def _unknown_target(tid: str, kind: str, cid: str, targets: frozenset[str], elsewhere: frozenset[str]) -> str:
    if kind == "writes":
        if tid in elsewhere:
            return f"{tid!r} is this section's own target: list it under copies_to, not writes"
        where = f"campaign {cid}"
    else:
        if tid in elsewhere:
            return f"{tid!r} is a target of campaign {cid}: list it under writes, not copies_to"
        where = "this section's [targets]"
    known = ", ".join(sorted(targets)) or "none"
    return f"no target {tid!r} in {where} (known: {known})"


def _unreachable(target: Target, channel: str, channels: Channels) -> str:
    usable = channels.reachable_by(target)
    what = channels.kind(channel).address_noun
    if usable:
        return f"target {target.id!r} has no {what}; it can be reached by: {', '.join(usable)}"
    return f"target {target.id!r} has no {what} (nor any other channel)"


def _check_templates(file: _File, campaign: Campaign, templates_dir: Path) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for i, lang in enumerate(campaign.letter_languages):
        folder = templates_dir / campaign.templates / lang
        if not folder.is_dir():
            problems.append(
                ConfigProblem(
                    file.shown,
                    f"campaign.letter_languages[{i}]",
                    f"no letter templates for {lang!r}: folder {_shown(folder, templates_dir.parent)}/ is missing",
                )
            )
    return problems
