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


@pytest.fixture
def tape_slice(tmp_path):
    """Return ``make(n)``: a recording of the shipped tape's first ``n`` lines in ``tmp_path`` (its path)."""
    from kimiha.venues.binance import iter_lines, recorded_tape

    def make(n: int):
        path = tmp_path / f"slice-{n}.txt"
        with path.open("wb") as f:
            for i, line in enumerate(iter_lines(recorded_tape())):
                if i == n:
                    break
                f.write(line + b"\n")
        return path

    return make
