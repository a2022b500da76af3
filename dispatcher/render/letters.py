"""Letters: which language a target gets, what the letter says, and its email form.

A letter is composed in two steps so that email and (later) fax share the words:

1. :meth:`Renderer.compose` runs the per-campaign, per-language letter template
   (``templates/<set>/<lang>/letter.j2``) and returns a :class:`Letter`: subject, salutation,
   model-letter paragraphs, the supporter's message, closing and signature, all plain text.
2. A channel layout (``templates/_layouts/email.txt.j2``, ``email.html.j2``, later a fax
   page) places those pieces. Escaping happens only there, in the HTML layouts.

See docs/letters.md for the template layout and the language fallback order.
"""

from __future__ import annotations

import datetime
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplatesNotFound, meta, nodes

from dispatcher.config.models import Campaign, Section, Target
from dispatcher.errors import DispatchError
from dispatcher.render.environment import make_environment

LAYOUTS = "_layouts"
LETTER = "letter.j2"
#: what a letter template must ``{% set %}``
LETTER_PARTS = ("subject", "body", "closing")

_LANGUAGE = re.compile(r"^[a-z]{2,3}$")
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
#: folds a subject onto one line but keeps no-break spaces (French "Tchétchénie\u00a0:")
_HEADER_SPACE = re.compile(r"[ \t\r\n]+")
#: what a letter template may read and still have its words kept for the next letter to the
#: same target on the same day: everything it is given but the supporter (and no globals:
#: ``lipsum`` is random)
_SHARED_CONTEXT = frozenset({"campaign", "section", "target", "language", "date", "salutation"})
#: words kept (per template, campaign, section, target, language, day and salutation) at most
_WORDS_KEPT = 4096


class TemplateMissing(DispatchError):
    """No usable letter: a template file, or a part a letter template must set, is missing.

    A deployment problem, not the supporter's: every letter of the campaign and language
    would fail the same way until templates/ is fixed.
    """


@dataclass(frozen=True)
class Supporter:
    name: str
    email: str
    city: str | None = None
    country: str | None = None


@dataclass(frozen=True)
class LetterRequest:
    campaign: Campaign
    section: Section
    target: Target
    #: the letter language, as chosen by :meth:`Renderer.choose_language`
    language: str
    supporter: Supporter
    message: str | None
    date: datetime.date
    #: a digest: the supporters whose letters this one carries (``supporter`` is then the
    #: section, which signs it)
    signers: tuple[Supporter, ...] = ()


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str
    language: str


@dataclass(frozen=True)
class Letter:
    """The words of one letter, plain text, independent of any channel."""

    language: str
    subject: str
    salutation: str
    #: the model letter, one string per paragraph
    paragraphs: tuple[str, ...]
    #: the supporter's personal message, line endings normalised, otherwise verbatim
    message: str | None
    closing: str
    #: the supporter's name, then "city, country" when known
    signature: tuple[str, ...]
    #: a digest's list of supporters, one "name, city, country" each, under its heading
    signers: tuple[str, ...] = ()
    signers_heading: str | None = None

    @property
    def message_paragraphs(self) -> tuple[str, ...]:
        """The message split at blank lines; line breaks inside a paragraph are kept."""
        if self.message is None:
            return ()
        return tuple(p for p in _BLANK_LINE.split(self.message) if p.strip())


def primary_language(code: str) -> str:
    """'de-CH' -> 'de': letters exist per language, not per regional variant."""
    return re.split(r"[-_]", code.strip(), maxsplit=1)[0].lower()


def salutation_for(target: Target, language: str, default_language: str) -> str:
    """The target's salutation in ``language``, else in the campaign default, else any."""
    for lang in (language, default_language):
        if lang in target.salutation:
            return target.salutation[lang]
    return next(iter(target.salutation.values()))


def normalise_message(message: str | None) -> str | None:
    if message is None:
        return None
    text = message.replace("\r\n", "\n").replace("\r", "\n").strip()
    return text or None


def split_paragraphs(body: str) -> tuple[str, ...]:
    """Paragraphs at blank lines; lines within one are joined, so templates may wrap freely."""
    return tuple(
        " ".join(line.strip() for line in block.splitlines() if line.strip())
        for block in _BLANK_LINE.split(body)
        if block.strip()
    )


#: the heading over a digest's list of supporters; worded around the count so that no language
#: needs its plural forms
SIGNERS_HEADING = {
    "en": "Signatures ({n}):",
    "de": "Unterschriften ({n}):",
    "fr": "Signatures ({n}) :",
    "ru": "Подписи ({n}):",
}


def signer_line(supporter: Supporter) -> str:
    return ", ".join(p.strip() for p in (supporter.name, supporter.city, supporter.country) if p and p.strip())


def signature_lines(supporter: Supporter) -> tuple[str, ...]:
    place = ", ".join(p.strip() for p in (supporter.city, supporter.country) if p and p.strip())
    return tuple(line for line in (supporter.name.strip(), place) if line)


def _reads_only_shared(environment: Any, template: Template) -> bool:
    """Whether ``template`` reads nothing but :data:`_SHARED_CONTEXT`: no supporter, no global,
    no other template (whose reads this cannot see), no ``random`` filter."""
    if template.filename is None:
        return False
    with open(template.filename, encoding="utf-8") as source:
        ast = environment.parse(source.read())
    if any(True for _ in meta.find_referenced_templates(ast)):
        return False
    if any(f.name == "random" for f in ast.find_all(nodes.Filter)):
        return False
    return meta.find_undeclared_variables(ast) <= _SHARED_CONTEXT


class Renderer:
    """Renders letters from a templates directory. One per process, shared by threads.

    Reads of its caches take no lock: entries are only ever added, each a pure function of
    files on disk, so a reader sees either nothing (and computes) or the final value. Only
    resolving a letter template takes the lock, so that a cold start under load compiles
    each letter once instead of once per thread.
    """

    def __init__(self, templates_dir: Path):
        self.templates_dir = Path(templates_dir)
        self.environment = make_environment(self.templates_dir)
        self._available: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        # Resolved per (set, language, target): the override lookup misses for most targets,
        # and Jinja caches hits only, so without this every letter would stat() the disk.
        self._letters: dict[tuple[str, str, str], Template] = {}
        self._lock = threading.Lock()
        # Whether a letter template's words depend only on what every letter to a target shares
        # (per template), and those words (see _words).
        self._shared: dict[str, bool] = {}
        self._words: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[str, tuple[str, ...], str]]] = {}

    # ------------------------------------------------------------------ language

    def available_languages(self, campaign: Campaign) -> list[str]:
        """The campaign's letter languages that have a ``letter.j2`` on disk, in its order."""
        key = (campaign.templates, tuple(campaign.letter_languages))
        found = self._available.get(key)
        if found is None:
            base = self.templates_dir / campaign.templates
            found = [lang for lang in key[1] if (base / lang / LETTER).is_file()]
            self._available[key] = found
        return list(found)

    def choose_language(
        self,
        campaign: Campaign,
        target: Target,
        appeal_language: str,
        supporter_languages: Sequence[str] = (),
    ) -> str:
        """The letter language for one target; see docs/letters.md for the order."""
        available = self.available_languages(campaign)
        appeal = primary_language(appeal_language)
        writes = {appeal, *(primary_language(lang) for lang in supporter_languages)}
        for lang in target.languages:
            if lang in writes and lang in available:
                return lang
        if appeal in available:
            return appeal
        if campaign.default_language in available:
            return campaign.default_language
        raise TemplateMissing(
            f"campaign {campaign.id}: no letter for its default language "
            f"{campaign.default_language!r} under {self.templates_dir / campaign.templates}"
        )

    # ------------------------------------------------------------------ letters

    def compose(self, req: LetterRequest) -> Letter:
        """The words of the letter for ``req``; the part email and fax share."""
        salutation = salutation_for(req.target, req.language, req.campaign.default_language)
        template = self._letter_template(req.campaign, req.language, req.target.id)
        subject, paragraphs, closing = self._template_words(template, req, salutation)
        return Letter(
            language=req.language,
            subject=subject,
            salutation=salutation.strip(),
            paragraphs=paragraphs,
            message=normalise_message(req.message),
            closing=closing,
            signature=signature_lines(req.supporter),
            signers=tuple(signer_line(s) for s in req.signers),
            signers_heading=SIGNERS_HEADING.get(req.language, SIGNERS_HEADING["en"]).format(n=len(req.signers))
            if req.signers
            else None,
        )

    def _template_words(
        self, template: Template, req: LetterRequest, salutation: str
    ) -> tuple[str, tuple[str, ...], str]:
        """(subject, paragraphs, closing) as the letter template sets them for ``req``.

        Kept for the next letter when the template reads nothing of the supporter (the model
        letters do not): every letter of a campaign to one target on one day then has the same
        words, and running the template and splitting its paragraphs was a fifth of rendering.
        Keyed by the identity of the objects it reads, which the entry holds, so that a reloaded
        catalog's new objects never find an old entry."""
        shared = self._shared.get(template.name or "")
        if shared is None:
            shared = self._shared[template.name or ""] = _reads_only_shared(self.environment, template)
        if not shared:
            return self._run_template(template, req, salutation)
        key = (id(template), id(req.campaign), id(req.section), id(req.target), req.language, req.date, salutation)
        found = self._words.get(key)
        if found is not None and found[0] == (template, req.campaign, req.section, req.target):
            return found[1]
        words = self._run_template(template, req, salutation)
        if len(self._words) >= _WORDS_KEPT:
            self._words.clear()  # a new day or a reloaded catalog: start again
        self._words[key] = ((template, req.campaign, req.section, req.target), words)
        return words

    def _run_template(
        self, template: Template, req: LetterRequest, salutation: str
    ) -> tuple[str, tuple[str, ...], str]:
        module = template.make_module(
            {
                "campaign": req.campaign,
                "section": req.section,
                "target": req.target,
                "supporter": req.supporter,
                "language": req.language,
                "date": req.date,
                "salutation": salutation,
            }
        )
        parts: dict[str, str] = {}
        for name in LETTER_PARTS:
            value = getattr(module, name, None)
            if value is None or not str(value).strip():
                raise TemplateMissing(f"{template.name} does not set {name!r}")
            parts[name] = str(value)
        return (
            # a header: one line, whatever the template's whitespace
            _HEADER_SPACE.sub(" ", parts["subject"]).strip(" "),
            split_paragraphs(parts["body"]),
            parts["closing"].strip(),
        )

    def render_email(self, req: LetterRequest) -> RenderedEmail:
        letter = self.compose(req)
        context: dict[str, Any] = {
            "letter": letter,
            "campaign": req.campaign,
            "section": req.section,
            "target": req.target,
            "supporter": req.supporter,
            "language": req.language,
            "date": req.date,
        }
        text = self._layout("email.txt.j2").render(context)
        html = self._layout("email.html.j2").render(context)
        return RenderedEmail(subject=letter.subject, text=text, html=html, language=letter.language)

    # ------------------------------------------------------------------ lookup

    def _layout(self, name: str) -> Template:
        return self.environment.get_template(f"{LAYOUTS}/{name}")

    def _letter_template(self, campaign: Campaign, language: str, target_id: str) -> Template:
        key = (campaign.templates, language, target_id)
        template = self._letters.get(key)
        if template is not None:
            return template
        if not _LANGUAGE.match(language):
            raise TemplateMissing(f"{language!r} is not a language code")
        with self._lock:
            template = self._letters.get(key)
            if template is None:
                folder = f"{campaign.templates}/{language}"
                try:
                    template = self.environment.select_template(
                        [f"{folder}/{target_id}.{LETTER}", f"{folder}/{LETTER}"]
                    )
                except TemplatesNotFound as exc:
                    raise TemplateMissing(
                        f"no letter for campaign {campaign.id} in {language!r}: "
                        f"looked for {', '.join(map(str, exc.templates))}"
                    ) from exc
                self._letters[key] = template
        return template
