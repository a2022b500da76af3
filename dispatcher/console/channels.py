"""Channels and numbers: paused channels (pause, resume) and flagged fax numbers (unflag)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
