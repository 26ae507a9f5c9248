"""Fixtures for tests that talk to the fake LLM: an in-process server and SDK clients bound to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import openai
import pytest

from tokenwatch.demo.fake_llm import FakeLLM, running_fake_llm

API_KEY = "sk-test-not-a-secret"


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLLM]:
    async with running_fake_llm() as fake:
        yield fake


@pytest.fixture
async def openai_client(fake_llm: FakeLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    """An async OpenAI client on the fake server, without retries (faults surface at once)."""
    async with openai.AsyncOpenAI(
        base_url=fake_llm.url + "/v1", api_key=API_KEY, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def anthropic_client(fake_llm: FakeLLM) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """An async Anthropic client on the fake server, without retries."""
    async with anthropic.AsyncAnthropic(
        base_url=fake_llm.url, api_key=API_KEY, max_retries=0
    ) as client:
        yield client
