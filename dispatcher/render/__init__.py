"""Rendering letters from templates/: language choice, letter words, email form (fax: dispatcher.render.fax)."""

from dispatcher.render.environment import make_environment
from dispatcher.render.letters import (
    Letter,
    LetterRequest,
    RenderedEmail,
    Renderer,
    Supporter,
    TemplateMissing,
)

__all__ = [
    "Letter",
    "LetterRequest",
    "RenderedEmail",
    "Renderer",
    "Supporter",
    "TemplateMissing",
    "make_environment",
]
