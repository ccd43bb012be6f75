"""Shared fixtures: every loop-dependent test runs on both asyncio and uvloop."""

from __future__ import annotations

import asyncio

import pytest

import kimiha

#: Generous ceiling so a deadlock fails the test instead of hanging CI; never a speed assertion.
HANG_TIMEOUT = 60.0


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def run(loop_name: str):
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""

    def _run(coro):
        async def guarded():
            async with asyncio.timeout(HANG_TIMEOUT):
                return await coro

        return kimiha.run(guarded(), loop=loop_name)

    return _run
