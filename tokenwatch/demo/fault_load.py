"""Load for fault runs (tests and bench/faults.py): an agent whose calls the SDK retries, and
tool definitions that weigh more than the prompt they come with."""

from __future__ import annotations

from typing import Any

RETRIED_CALLS = """
import openai
client = openai.OpenAI(api_key="sk-test-not-a-secret")  # the SDK's default retries
topics = "sky sea rain snow wind fire stone glass iron salt".split()  # no loop for the rules
for topic in topics:
    try:
        client.chat.completions.create(
            model="gpt-4o-mini", max_tokens=20,
            messages=[{"role": "user", "content": f"Tell me about {topic}."}])
        print("ok", flush=True)
    except openai.RateLimitError as exc:
        print("refused" if "budget" in str(exc) else f"failed {exc}", flush=True)
"""
"""An openai-python agent (`python -c`): ten calls with max_tokens 20, printing `ok`, or
`refused` when a budget refused it."""

_PARAMETERS = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "What to look up, in a sentence"}},
    "required": ["query"],
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": f"lookup_{k}",
            "description": "Look something up in the knowledge base and answer with its facts.",
            "parameters": _PARAMETERS,
        },
    }
    for k in range(8)
]
"""Eight Chat Completions tool definitions, billed as input (some 600 tokens)."""
