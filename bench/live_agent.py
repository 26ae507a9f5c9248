"""A recorded agent, live: sends its requests (JSON lines: wire, body, idle, copies) through the
base URLs `tokenwatch run` gives it, waits `idle` seconds after each answer as the agent did, and
prints each call's index once answered (its pid first), so the bench can tell where it stopped."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any


def _post(wire: str, body: dict[str, Any]) -> None:
    headers = {"content-type": "application/json"}
    if wire == "anthropic":
        url = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages"
        headers |= {"x-api-key": "dummy", "anthropic-version": "2023-06-01"}
    else:
        path = "/responses" if wire == "responses" else "/chat/completions"
        url = os.environ["OPENAI_BASE_URL"] + path
        headers["authorization"] = "Bearer dummy"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        print(f"call refused: {exc.code} {exc.read()[:200]!r}", file=sys.stderr, flush=True)


def main() -> None:
    with open(sys.argv[1]) as fh:
        requests = [json.loads(line) for line in fh]
    print(os.getpid(), flush=True)
    for i, r in enumerate(requests):
        copies = [
            threading.Thread(target=_post, args=(r["wire"], r["body"]), name=f"copy-{n}")
            for n in range(r["copies"])
        ]
        for t in copies:
            t.start()
        for t in copies:
            t.join()
        print(i, flush=True)
        time.sleep(r["idle"])


if __name__ == "__main__":
    main()
