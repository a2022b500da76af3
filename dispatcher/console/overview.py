"""The overview page: what is going on, at a glance."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from dispatcher.console.pages import render
from dispatcher.console.scope import Context, CurrentOperator

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, operator: CurrentOperator, ctx: Context) -> HTMLResponse:
    return render(request, "overview.html", nav="Overview")
