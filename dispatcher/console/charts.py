"""Charts drawn on the server as SVG: no script, no chart library, nothing fetched.

The pages put the SVG inline. It uses presentation attributes only (``fill``, ``stroke``): the
console's Content-Security-Policy refuses inline ``style`` attributes. Every chart has a
``<title>`` and an ``aria-label`` saying in words what it shows, and the page has the numbers in
a table as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

from markupsafe import Markup, escape

WIDTH, HEIGHT = 640, 170
LEFT, RIGHT, TOP, BOTTOM = 36, 8, 10, 30


def letters_per_day(days: Sequence[tuple[date, int]], *, deadline: date | None, label: str) -> Markup:
    """Bars of letters released per day; a red line at the deadline's day. ``label``: what the
    chart is of (a recipient), for its title."""
    if not days:
        return Markup("")
    most = max((n for _d, n in days), default=0)
    top = _nice(most)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM
    step = plot_w / len(days)
    bar = max(step * 0.8, 1.0)
    total = sum(n for _d, n in days)
    summary = (
        f"{label}: {total} letters over {len(days)} days, at most {most} a day, "
        f"from {days[0][0].isoformat()} to {days[-1][0].isoformat()}"
    )
    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(summary)}">',
        f"<title>{escape(summary)}</title>",
        # axes and the top gridline with its value
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#9a9a9a"/>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - RIGHT}" y2="{TOP + plot_h}" stroke="#9a9a9a"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{WIDTH - RIGHT}" y2="{TOP}" stroke="#e0e0e0"/>',
        f'<text x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end" font-size="11" fill="#5b5b5b">{top}</text>',
        f'<text x="{LEFT - 4}" y="{TOP + plot_h}" text-anchor="end" font-size="11" fill="#5b5b5b">0</text>',
    ]
    every = max(1, round(len(days) / 8))
    for i, (day, n) in enumerate(days):
        x = LEFT + i * step + (step - bar) / 2
        h = 0.0 if top == 0 else plot_h * n / top
        parts.append(
            f'<rect class="bar" x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
            f'fill="#1f4e8c"><title>{day.isoformat()}: {n}</title></rect>'
        )
        if i % every == 0:
            parts.append(
                f'<text x="{LEFT + i * step + step / 2:.1f}" y="{HEIGHT - 12}" text-anchor="middle" '
                f'font-size="11" fill="#5b5b5b">{day.strftime("%d %b")}</text>'
            )
        if deadline is not None and day == deadline:
            x_dead = LEFT + (i + 1) * step
            parts.append(
                f'<line x1="{x_dead:.1f}" y1="{TOP}" x2="{x_dead:.1f}" y2="{TOP + plot_h}" stroke="#8a1c10" '
                f'stroke-dasharray="4 3"/>'
                f'<text x="{x_dead - 3:.1f}" y="{TOP + 12}" text-anchor="end" font-size="11" '
                f'fill="#8a1c10">deadline</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - its only text (the label) is escaped above; the rest are numbers and dates


def _nice(n: int) -> int:
    """The axis' top: ``n`` rounded up to 1, 2 or 5 times a power of ten."""
    if n <= 0:
        return 0
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale >= n:
                return m * scale
        scale *= 10
