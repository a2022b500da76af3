"""The framework's own ceiling for bench/intake.py: a FastAPI app whose POST /v1/appeals only
reads the body, parses the JSON and answers 202, served by uvicorn as ``dispatcher api`` serves
the real one (same host, log level, and worker count).

    .venv/bin/python bench/intake_bare.py --port 8081 [--workers N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()


@app.post("/v1/appeals", status_code=202)
async def post_appeal(request: Request) -> JSONResponse:
    data = json.loads(await request.body())
    return JSONResponse({"client_ref": data.get("client_ref"), "accepted": True}, status_code=202)


@app.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.workers > 1:
        # several processes need the app as an import string
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        uvicorn.run("intake_bare:app", host=args.host, port=args.port, log_level="warning", workers=args.workers)
    else:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
