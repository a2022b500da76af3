"""Letters: language choice, the words of UA 002/19, escaping, and template failures."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from jinja2 import UndefinedError

from dispatcher.config.models import Campaign, Section, Target
from dispatcher.render import LetterRequest, Renderer, Supporter, TemplateMissing

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

# ---------------------------------------------------------------------------- factories


def make_target(**overrides: Any) -> Target:
    fields: dict[str, Any] = {
        "id": "president",
        "name": "Vladimir Putin",
        "title": "President of the Russian Federation",
        "address": ["Ul. Ilyinka, 23", "103132 Moscow", "Russian Federation"],
        "country": "RU",
        "timezone": "Europe/Moscow",
        "salutation": {
            "en": "Dear President,",
            "ru": "Уважаемый господин Президент!",
            "de": "Sehr geehrter Herr Präsident,",
            "fr": "Monsieur le Président,",
        },
        "languages": ["ru", "en"],
    }
    fields.update(overrides)
    return Target(**fields)


def make_ambassador() -> Target:
    return make_target(
        id="ambassador-us",
        name="Anatoly Antonov",
        title="Ambassador",
        organisation="Embassy of the Russian Federation",
        address=["2650 Wisconsin Ave. NW", "Washington DC 20007"],
        country="US",
        timezone="America/New_York",
        salutation={"en": "Dear Ambassador,"},
    )


def make_campaign(*targets: Target, **overrides: Any) -> Campaign:
    targets = targets or (make_target(),)
    fields: dict[str, Any] = {
        "id": "UA-002-19",
        "title": "Homophobic crackdown in Chechnya resumes",
        "ai_index": "EUR 46/9686/2019",
        "issued": date(2019, 1, 15),
        "deadline": date(2019, 2, 26),
        "preferred_languages": ["ru", "en"],
        "letter_languages": ["en", "ru", "de", "fr"],
        "default_language": "en",
        "targets": {t.id: t for t in targets},
    }
    fields.update(overrides)
    return Campaign(**fields)


def make_section() -> Section:
    return Section(
        code="ch",
        name="Amnesty International Switzerland",
        country="CH",
        timezone="Europe/Zurich",
        languages=["de", "fr", "it", "en"],
        intake_key_env="CH_INTAKE_KEY",
        sender={"name": "Amnesty Switzerland", "address": "appeals@example.org"},
        smtp={"host": "127.0.0.1"},
    )


JANE = Supporter(name="Jane Doe", email="jane@example.org", city="Boston", country="USA")


def make_request(
    *,
    campaign: Campaign | None = None,
    target: Target | None = None,
    language: str = "en",
    supporter: Supporter = JANE,
    message: str | None = None,
) -> LetterRequest:
    target = target or make_target()
    return LetterRequest(
        campaign=campaign or make_campaign(target),
        section=make_section(),
        target=target,
        language=language,
        supporter=supporter,
        message=message,
        date=date(2019, 1, 20),
    )


def write_templates(root: Path, files: dict[str, str], *, layouts: bool = True) -> Path:
    """A templates dir in ``root``: the repository's layouts plus ``files``."""
    if layouts:
        shutil.copytree(TEMPLATES / "_layouts", root / "_layouts")
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def simple_letter(body: str, subject: str = "Subject") -> str:
    return (
        f'{{% set subject = "{subject}" %}}\n'
        '{% set closing = "Regards," %}\n'
        f"{{% set body %}}\n{body}\n{{% endset %}}\n"
    )


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES)


# ---------------------------------------------------------------------------- language choice


def test_available_languages_are_the_ones_on_disk(renderer: Renderer) -> None:
    assert renderer.available_languages(make_campaign()) == ["en", "ru", "de", "fr"]


def test_target_preferred_language_when_the_supporter_declares_it(renderer: Renderer) -> None:
    campaign, president = make_campaign(), make_target()
    assert renderer.choose_language(campaign, president, "de", ["ru"]) == "ru"
    # the target's order wins over the supporter's: ru before en
    assert renderer.choose_language(campaign, president, "en", ["ru"]) == "ru"
    assert renderer.choose_language(campaign, president, "en") == "en"


def test_supporter_language_when_the_target_prefers_another(renderer: Renderer) -> None:
    campaign, president = make_campaign(), make_target()
    assert renderer.choose_language(campaign, president, "de") == "de"
    assert renderer.choose_language(campaign, president, "fr", ["it"]) == "fr"
    # a regional variant from a web form selects the language's letter
    assert renderer.choose_language(campaign, president, "de-CH") == "de"


def test_campaign_default_when_no_letter_fits(renderer: Renderer) -> None:
    campaign, president = make_campaign(), make_target()
    assert renderer.choose_language(campaign, president, "it") == "en"
    assert renderer.choose_language(campaign, president, "es", ["pt"]) == "en"


def test_a_language_without_templates_is_never_chosen(tmp_path: Path) -> None:
    root = write_templates(
        tmp_path,
        {
            "UA-002-19/en/letter.j2": simple_letter("English."),
            "UA-002-19/de/letter.j2": simple_letter("Deutsch."),
            # an override alone does not make a language available
            "UA-002-19/ru/president.letter.j2": simple_letter("Русский."),
        },
    )
    renderer = Renderer(root)
    campaign = make_campaign(letter_languages=["en", "ru", "de", "es"])
    president = make_target()
    assert renderer.available_languages(campaign) == ["en", "de"]
    assert renderer.choose_language(campaign, president, "ru") == "en"
    assert renderer.choose_language(campaign, president, "es", ["ru"]) == "en"
    assert renderer.choose_language(campaign, president, "de", ["ru"]) == "de"


def test_missing_default_language_letter_is_reported(tmp_path: Path) -> None:
    root = write_templates(tmp_path, {"UA-002-19/de/letter.j2": simple_letter("Deutsch.")})
    renderer = Renderer(root)
    with pytest.raises(TemplateMissing, match="default language 'en'"):
        renderer.choose_language(make_campaign(), make_target(), "it")


# ---------------------------------------------------------------------------- the letters


def test_english_letter_to_the_president(renderer: Renderer) -> None:
    email = renderer.render_email(make_request(language="en"))
    assert email.language == "en"
    assert email.subject == "Chechnya: investigate the homophobic detentions, torture and killings"
    assert email.text.startswith("Dear President,\n\nI am deeply concerned about the reports")
    assert "the city of Argun" in email.text
    assert "brought to justice." in email.text
    assert email.text.endswith("Yours sincerely,\n\nJane Doe\nBoston, USA\n")
    assert "<p>Dear President,</p>" in email.html
    assert "<p>Jane Doe<br>Boston, USA</p>" in email.html


def test_each_target_gets_its_own_salutation(renderer: Renderer) -> None:
    ambassador = make_ambassador()
    campaign = make_campaign(make_target(), ambassador)
    email = renderer.render_email(make_request(campaign=campaign, target=ambassador))
    assert email.text.startswith("Dear Ambassador,\n\nI am deeply concerned")
    assert "Dear President" not in email.text


def test_salutation_falls_back_to_the_default_language(renderer: Renderer) -> None:
    ambassador = make_ambassador()  # has an English salutation only
    campaign = make_campaign(make_target(), ambassador)
    letter = renderer.compose(make_request(campaign=campaign, target=ambassador, language="fr"))
    assert letter.salutation == "Dear Ambassador,"
    assert letter.paragraphs[0].startswith("Les informations faisant état")


def test_russian_letter_is_russian(renderer: Renderer) -> None:
    email = renderer.render_email(make_request(language="ru"))
    assert email.text.startswith("Уважаемый господин Президент!\n\n")
    assert "С уважением," in email.text
    assert '<html lang="ru">' in email.html
    letter = renderer.compose(make_request(language="ru"))
    words = "".join((letter.subject, *letter.paragraphs))
    letters_only = [ch for ch in words if ch.isalpha()]
    assert letters_only
    assert all("\u0400" <= ch <= "\u04ff" for ch in letters_only)


@pytest.mark.parametrize("language", ["en", "ru", "de", "fr"])
def test_every_language_has_a_complete_letter(renderer: Renderer, language: str) -> None:
    letter = renderer.compose(make_request(language=language))
    assert letter.language == language
    assert len(letter.paragraphs) == 2
    assert letter.subject and "\n" not in letter.subject
    assert letter.closing
    assert letter.signature == ("Jane Doe", "Boston, USA")


def test_subjects_differ_per_language(renderer: Renderer) -> None:
    subjects = {renderer.compose(make_request(language=x)).subject for x in ("en", "ru", "de", "fr")}
    assert len(subjects) == 4


# ---------------------------------------------------------------------------- supporter input


def test_html_escapes_the_message_and_the_text_keeps_it(renderer: Renderer) -> None:
    message = "Free them now.\n<script>alert(1)</script>"
    evil = Supporter(name="<b>Mallory</b>", email="m@example.org", city="Bern", country="CH")
    email = renderer.render_email(make_request(message=message, supporter=evil))

    assert "<script>alert(1)</script>" in email.text
    assert "<b>Mallory</b>" in email.text

    assert "<script>" not in email.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "<p>Free them now.<br>\n&lt;script&gt;alert(1)&lt;/script&gt;</p>" in email.html
    assert "&lt;b&gt;Mallory&lt;/b&gt;" in email.html
    assert "<b>" not in email.html


def test_message_is_its_own_paragraphs_after_the_model_letter(renderer: Renderer) -> None:
    message = "First thought.\r\n\r\n\r\nSecond thought,\r\nover two lines."
    email = renderer.render_email(make_request(message=message))
    assert (
        "sexual orientation.</p>\n<p>First thought.</p>\n<p>Second thought,<br>\nover two lines.</p>\n"
        "<p>Yours sincerely,</p>"
    ) in email.html
    assert (
        "real or perceived sexual orientation.\n\n"
        "First thought.\n\n\nSecond thought,\nover two lines.\n\n"
        "Yours sincerely,\n"
    ) in email.text


@pytest.mark.parametrize("message", [None, "", "   \n\n  "])
def test_no_message_leaves_no_empty_paragraph(renderer: Renderer, message: str | None) -> None:
    email = renderer.render_email(make_request(message=message))
    assert "\n\n\n" not in email.text
    assert "sexual orientation.\n\nYours sincerely," in email.text
    assert not re.search(r"<p>\s*</p>", email.html)
    # salutation, two model paragraphs, closing, signature
    assert email.html.count("<p>") == 5


def test_signature_skips_what_the_supporter_did_not_give(renderer: Renderer) -> None:
    anonymous_place = Supporter(name="Jane Doe", email="jane@example.org", country="CH")
    email = renderer.render_email(make_request(supporter=anonymous_place))
    assert email.text.endswith("Yours sincerely,\n\nJane Doe\nCH\n")
    bare = Supporter(name="Jane Doe", email="jane@example.org")
    assert renderer.render_email(make_request(supporter=bare)).text.endswith("\n\nJane Doe\n")


# ---------------------------------------------------------------------------- templates


def test_per_target_override_comes_first(tmp_path: Path) -> None:
    root = write_templates(
        tmp_path,
        {
            "UA-002-19/en/letter.j2": simple_letter("The model letter."),
            "UA-002-19/en/ambassador-us.letter.j2": simple_letter("Please convey to {{ target.organisation }}."),
        },
    )
    renderer = Renderer(root)
    ambassador = make_ambassador()
    campaign = make_campaign(make_target(), ambassador)
    to_ambassador = renderer.compose(make_request(campaign=campaign, target=ambassador))
    assert to_ambassador.paragraphs == ("Please convey to Embassy of the Russian Federation.",)
    to_president = renderer.compose(make_request(campaign=campaign))
    assert to_president.paragraphs == ("The model letter.",)


def test_template_set_names_the_folder(tmp_path: Path) -> None:
    root = write_templates(tmp_path, {"UA-002-19/en/letter.j2": simple_letter("Shared.")})
    renderer = Renderer(root)
    demo = make_campaign(id="UA-002-19-DEMO", template_set="UA-002-19")
    assert renderer.available_languages(demo) == ["en"]
    assert renderer.compose(make_request(campaign=demo)).paragraphs == ("Shared.",)


def test_wrapped_template_lines_join_into_one_paragraph(tmp_path: Path) -> None:
    body = "One paragraph\n   wrapped in the file.\n\n\nAnother."
    root = write_templates(tmp_path, {"UA-002-19/en/letter.j2": simple_letter(body)})
    letter = Renderer(root).compose(make_request())
    assert letter.paragraphs == ("One paragraph wrapped in the file.", "Another.")


def test_undefined_variable_in_a_letter_fails_loudly(tmp_path: Path) -> None:
    body = "Dear {{ target.nickname }}, see {{ no_such_thing }}."
    root = write_templates(tmp_path, {"UA-002-19/en/letter.j2": simple_letter(body)})
    with pytest.raises(UndefinedError):
        Renderer(root).render_email(make_request())


def test_undefined_variable_in_a_layout_fails_loudly(tmp_path: Path) -> None:
    root = write_templates(
        tmp_path,
        {
            "UA-002-19/en/letter.j2": simple_letter("Body."),
            "_layouts/email.txt.j2": "{{ letter.salutation }} {{ letter.postscript }}\n",
            "_layouts/email.html.j2": "<p>{{ letter.salutation }}</p>\n",
        },
        layouts=False,
    )
    with pytest.raises(UndefinedError):
        Renderer(root).render_email(make_request())


def test_a_letter_template_must_set_its_parts(tmp_path: Path) -> None:
    root = write_templates(tmp_path, {"UA-002-19/en/letter.j2": '{% set subject = "S" %}{% set body %}B{% endset %}'})
    with pytest.raises(TemplateMissing, match="closing"):
        Renderer(root).compose(make_request())


def test_missing_letter_file_is_template_missing(tmp_path: Path) -> None:
    root = write_templates(tmp_path, {"UA-002-19/en/letter.j2": simple_letter("Body.")})
    with pytest.raises(TemplateMissing, match=r"UA-002-19/ru/letter\.j2"):
        Renderer(root).compose(make_request(language="ru"))


def test_shared_renderer_across_threads(tmp_path: Path) -> None:
    root = write_templates(tmp_path, {})
    shutil.copytree(TEMPLATES / "UA-002-19", root / "UA-002-19")
    renderer = Renderer(root)  # cold: threads race to compile and cache
    requests = [
        make_request(language=lang, message=f"Message {i}") for i, lang in enumerate(["en", "ru", "de", "fr"] * 50)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        emails = list(pool.map(renderer.render_email, requests))
    reference = Renderer(TEMPLATES)
    assert emails == [reference.render_email(r) for r in requests]


def test_a_letter_that_reads_the_supporter_is_written_for_each_supporter(tmp_path: Path) -> None:
    """The words of a letter template that reads only what every letter to a target shares are
    kept from one letter to the next; one that reads the supporter (or anything else it is not
    sure of: a random filter, another template) is run for every letter."""
    root = write_templates(
        tmp_path,
        {
            "UA-002-19/en/letter.j2": simple_letter("From {{ supporter.city }}, to {{ target.organisation }}."),
            "UA-002-19/fr/letter.j2": simple_letter("Pour {{ target.organisation }}, le {{ date }}."),
            "UA-002-19/de/letter.j2": simple_letter("{{ ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h'] | random }}"),
        },
    )
    renderer = Renderer(root)
    target = make_target()
    campaign = make_campaign(target)
    lyon = Supporter("Jane Roe", "jane@example.net", "Lyon", "FR")
    oslo = Supporter("Ola Nordmann", "ola@example.no", "Oslo", "NO")
    english = make_request(campaign=campaign, target=target, supporter=lyon)
    words = [renderer.compose(replace(english, supporter=s)).paragraphs for s in (lyon, oslo)]
    assert [p[0].split(",")[0] for p in words] == ["From Lyon", "From Oslo"]
    french = make_request(campaign=campaign, target=target, language="fr")
    letters = [renderer.compose(replace(french, supporter=s)) for s in (lyon, oslo)]
    assert letters[0].paragraphs[0].startswith("Pour ") and "2019-01-20" in letters[0].paragraphs[0]
    # the same words object: the template ran once
    assert letters[0].paragraphs is letters[1].paragraphs
    assert [letter.signature[0] for letter in letters] == ["Jane Roe", "Ola Nordmann"]
    german = make_request(campaign=campaign, target=target, language="de")
    assert len({renderer.compose(german).paragraphs for _ in range(40)}) > 1
