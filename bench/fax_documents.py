"""What a fax costs: the PDF (WeasyPrint), its TIFF (PDFium + Pillow), and a fax lab call
(two spandsp T.30 terminals in software), per page.

One thread, nothing else running, UA 002/19 (-DEMO copy) with a short personal message:

* English to the ambassador in Washington (Letter paper),
* Russian to the President in Moscow (A4).

Each case is rendered ``--runs`` times after one warm-up (fonts, stylesheets and templates are
loaded once per thread, see dispatcher/render/fax.py); the table shows medians, in milliseconds
per page (cover included), and the whole document. No assertions: docs/fax-documents.md quotes
the figures.

    .venv/bin/python bench/fax_documents.py [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import weasyprint  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from dispatcher.channels.fax.base import FaxJob  # noqa: E402
from dispatcher.config.loader import load_catalog  # noqa: E402
from dispatcher.logging import configure  # noqa: E402
from dispatcher.render.fax import FaxRenderer, paper_for, pdf_to_fax_tiff  # noqa: E402
from dispatcher.render.faxraster import Resolution  # noqa: E402
from dispatcher.render.letters import LetterRequest, Renderer, Supporter  # noqa: E402
from dispatcher.sandbox.faxlab import FaxLab  # noqa: E402

CAMPAIGN = "UA-002-19-DEMO"
SENT_AT = datetime(2019, 5, 10, 9, 30, tzinfo=UTC)
CASES = (("English → US (Letter)", "us", "ambassador-us", "en"), ("Russian → RU (A4)", "us", "president", "ru"))

T = TypeVar("T")


#: the lab's normal fax machine (UK drama range), see docs/fax-lab.md
LAB_NUMBER = "+442079460100"


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    configure("WARNING")  # one log line per lab call would drown the table

    catalog = load_catalog(ROOT / "config", ROOT / "templates").with_demo_copies(date.today())
    faxes = FaxRenderer(Renderer(ROOT / "templates"))

    table = Table(title=f"Fax documents: median of {args.runs} runs, one thread, ms")
    columns = (
        "letter",
        "pages",
        "PDF / page",
        "TIFF fine / page",
        "TIFF std / page",
        "lab call / page",
        "line s / page",
        "PDF KiB",
        "TIFF KiB",
        "whole",
    )
    lab = FaxLab(Path(tempfile.mkdtemp(prefix="bench-faxlab-")), trace=False)
    for column in columns:
        table.add_column(column, justify="left" if column == "letter" else "right", no_wrap=True)

    for label, section, target_id, language in CASES:
        req = LetterRequest(
            campaign=catalog.campaign(CAMPAIGN),
            section=catalog.section(section),
            target=catalog.target(CAMPAIGN, section, target_id),
            language=language,
            supporter=Supporter(name="Jane Doe", email="jane@example.org", city="Boston", country="US"),
            message="I am writing to add my voice to this appeal.\n\nPlease act without delay.",
            date=SENT_AT.date(),
        )
        paper = paper_for(req.target.country)
        faxes.render(req, sent_at=SENT_AT)  # warm-up: this thread's fonts and stylesheets

        pdf_ms: list[float] = []
        tiff_ms: dict[Resolution, list[float]] = {"fine": [], "standard": []}
        pdf = b""
        tiff = b""
        pages = 0
        for _ in range(args.runs):
            pdf, ms = timed(partial(faxes.render_pdf, req, sent_at=SENT_AT))
            pdf_ms.append(ms)
            for resolution, samples in tiff_ms.items():
                (out, pages), ms = timed(partial(pdf_to_fax_tiff, pdf, resolution=resolution, paper=paper))
                samples.append(ms)
                if resolution == "fine":
                    tiff = out

        # A real T.30 call of the fine TIFF through the lab: wall time of the call itself, and the
        # line time it simulates (what the same call takes on a real fax line).
        call_ms: list[float] = []
        line_s: list[float] = []
        for _ in range(max(3, args.runs // 4)):
            job = FaxJob(tag="bench", to_number=LAB_NUMBER, pdf=pdf, tiff=tiff, pages=pages)
            report = lab.send_sync(job)
            assert report.pages == pages, report
            call_ms.append(float(report.extra["wall_ms"]))
            line_s.append(report.duration_s or 0.0)

        pdf_median = statistics.median(pdf_ms)
        fine_median = statistics.median(tiff_ms["fine"])
        table.add_row(
            label,
            str(pages),
            f"{pdf_median / pages:.1f}",
            f"{fine_median / pages:.1f}",
            f"{statistics.median(tiff_ms['standard']) / pages:.1f}",
            f"{statistics.median(call_ms) / pages:.1f}",
            f"{statistics.median(line_s) / pages:.0f}",
            f"{len(pdf) / 1024:.0f}",
            f"{len(tiff) / 1024:.0f}",
            f"{pdf_median + fine_median:.0f}",
        )

    console = Console(width=160)
    console.print(table)
    console.print(
        f"Python {sys.version.split()[0]}, WeasyPrint {weasyprint.__version__}; "
        "'whole' = PDF + fine TIFF for the document. Without Debian's libharfbuzz-subset0, WeasyPrint "
        "falls back to fontTools for font subsetting and the PDF step is several times slower."
    )


if __name__ == "__main__":
    main()
