"""``kimiha.run``: asyncio.run's behaviour on either loop, with an end that keeps its deadline.

The hanging cases run in a child process: before the bounded end, the child never exited, and the test's
``timeout`` on the child (a hang guard, not a speed claim) is what failed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

import kimiha
from kimiha import InvalidConfigurationError
from kimiha.runtime import LOOPS

CHILD_TIMEOUT = 60.0  # hang guard


def run_child(code: str, *, interrupt_on: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; with ``interrupt_on``, send SIGINT once it prints that line."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        if interrupt_on is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == interrupt_on, (line, proc.stderr.read() if proc.stderr else "")
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the child did not exit within {CHILD_TIMEOUT} s (hung at the end of kimiha.run)\n"
                    f"stdout: {out}\nstderr: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


STUBBORN = """
    import asyncio, logging, sys, time
    import kimiha
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    swallowed = []

    async def stubborn():
        while True:  # the retry loop that eats its own cancellation
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed.append(1)

    async def polite():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("polite cancelled", flush=True)
            raise

    async def main():
        asyncio.get_running_loop().create_task(stubborn(), name="stubborn")
        asyncio.get_running_loop().create_task(polite(), name="polite")
        await asyncio.sleep(0)
        return 42

    t0 = time.monotonic()
    print("result", kimiha.run(main(), loop=LOOP, shutdown_timeout=0.5), flush=True)
    print("swallowed", len(swallowed) > 0, flush=True)
    print("ended within", time.monotonic() - t0 < CHILD_TIMEOUT / 2, flush=True)
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_a_task_swallowing_cancellation_does_not_hang_the_end_of_run(loop):
    code = f"LOOP = {loop!r}; CHILD_TIMEOUT = {CHILD_TIMEOUT}\n" + textwrap.dedent(STUBBORN)
    done = run_child(code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "polite cancelled" in lines  # the well-behaved task was still cancelled and awaited
    assert "result 42" in lines
    assert "swallowed True" in lines  # the stubborn one really was cancelled, and ate it
    assert "ended within True" in lines
    # the ERROR names the task left behind and says why
    assert "ERROR" in done.stderr and "did not finish within 0.5 s of their cancellation" in done.stderr
    assert "Task was destroyed but it is pending" not in done.stderr, done.stderr  # the ERROR said it
    assert "stubborn" in done.stderr and "left behind" in done.stderr, done.stderr
    assert "polite (polite)" not in done.stderr


AGEN_AND_EXECUTOR = """
    import asyncio, logging, sys, threading
    import kimiha
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    release = threading.Event()
    kept = []

    async def stubborn_agen():
        try:
            yield 1
        finally:
            while True:  # its close ignores cancellation
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass

    async def main():
        gen = stubborn_agen()
        await gen.__anext__()
        kept.append(gen)  # left open (and not collected): run()'s shutdown_asyncgens closes it
        asyncio.get_running_loop().run_in_executor(None, release.wait, 60)
        return "done"

    print(kimiha.run(main(), loop=LOOP, shutdown_timeout=0.5), flush=True)
    release.set()  # the executor's thread ends now; the interpreter waits for it at exit
"""


@pytest.mark.parametrize("loop", LOOPS)
def test_an_async_generator_ignoring_cancellation_and_a_busy_executor_do_not_hang_the_end(loop):
    """Before: closing async generators had a wait_for whose cancellation waited forever on such a generator,
    and the executor's shutdown had no deadline at all."""
    done = run_child(f"LOOP = {loop!r}\n" + textwrap.dedent(AGEN_AND_EXECUTOR))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["done"]
    assert "closing async generators did not finish within 0.5 s" in done.stderr, done.stderr
    assert "shutting down the default executor" in done.stderr, done.stderr
    assert "Task was destroyed but it is pending" not in done.stderr, done.stderr


@pytest.mark.parametrize("loop", LOOPS)
def test_ctrl_c_cancels_main_and_raises_keyboard_interrupt(loop):
    code = f"""
        import asyncio, kimiha
        async def main():
            try:
                print("ready", flush=True)
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                print("main cancelled", flush=True)
                raise
        try:
            kimiha.run(main(), loop={loop!r})
        except KeyboardInterrupt:
            print("KeyboardInterrupt", flush=True)
    """
    done = run_child(code, interrupt_on="ready")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["main cancelled", "KeyboardInterrupt"], done.stdout


@pytest.mark.parametrize("loop", LOOPS)
def test_run_returns_the_result_raises_mains_error_and_closes_async_generators(loop):
    closed = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            closed.append("agen")

    async def main():
        gen = agen()
        assert await gen.__anext__() == 1  # left suspended: run() closes it at the end
        return "ok"

    assert kimiha.run(main(), loop=loop) == "ok"
    assert closed == ["agen"]

    async def failing():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        kimiha.run(failing(), loop=loop)


def test_run_refuses_bad_arguments_with_messages_that_name_them():
    async def main():
        return 1

    coro = main()
    with pytest.raises(InvalidConfigurationError, match=r"shutdown_timeout=.*expected seconds > 0.*got int 0"):
        kimiha.run(coro, shutdown_timeout=0)
    assert coro.cr_frame is None  # closed: no "never awaited" warning
    with pytest.raises(InvalidConfigurationError, match=r"shutdown_timeout=.*got bool True"):
        kimiha.run(main(), shutdown_timeout=True)
    # before: accepted, then float() failed in the end phase, after main had run (its result lost)
    with pytest.raises(InvalidConfigurationError, match=r"shutdown_timeout=.*got int 1000"):
        kimiha.run(main(), shutdown_timeout=10**400)
    assert kimiha.run(main(), shutdown_timeout=float("inf")) == 1
    with pytest.raises(TypeError, match=r"run\(main\): expected a coroutine, got function"):
        kimiha.run(main)  # type: ignore[arg-type]

    async def nested():
        inner = main()
        with pytest.raises(RuntimeError, match="running event loop"):
            kimiha.run(inner)
        assert inner.cr_frame is None

    kimiha.run(nested())


def test_the_sigint_handler_is_restored_after_run():
    async def main():
        return signal.getsignal(signal.SIGINT)

    during = kimiha.run(main())
    assert during is not signal.default_int_handler  # run() had its own while main ran
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
