"""The folders a run of ``kimiha demo --distributed`` owns (its rings, or its nats-server's store and
configuration), and their reaping once the owner is gone however it died (SIGKILL included).

* A folder whose owner was SIGKILLed is reaped by the next start; one whose owner lives, or one being made
  (no owner file yet, young), never is; a dead run's rings that a live process still holds are left.
* ``--transport shm`` and ``--transport nats`` reap the folders of killed runs when they start, and leave
  nothing of their own behind.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kimiha.apps import distributed
from kimiha.apps.rundir import OWNER_FILE, UNOWNED_AGE, RunDirectory, owner_alive, reap_stale

OWNER = textwrap.dedent('''
    import sys, time
    from kimiha.apps.rundir import RunDirectory
    parent, name, nats = sys.argv[1], sys.argv[2], sys.argv[3] == "nats"
    run = RunDirectory(parent, name)
    (run.path / "w.ring").mkdir()  # something of the run's in it
    if nats:  # the demo's nats-server folders, made as the coordinator makes them
        from kimiha.bridge import NatsServer
        server = NatsServer(auth=True, temp_dir=run.path)
        print(server.store_dir, server.config_file.parent)
    print("ready", flush=True)
    time.sleep(600)
''')


def killed_owner(parent: Path, name: str, nats: bool = False) -> list[str]:
    """Start a process that owns ``parent/name`` and SIGKILL it; return what it printed before."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(parent), name, "nats" if nats else "-"],
                            stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            lines.append(line.strip())
        else:
            raise AssertionError(f"the owner exited with {proc.wait()} before it was ready")
        assert owner_alive(parent / name) is True
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return lines


def test_a_folder_whose_owner_was_killed_is_reaped_and_a_living_one_is_not(tmp_path):
    killed_owner(tmp_path, "demo-dead")
    assert (tmp_path / "demo-dead" / OWNER_FILE).exists() and owner_alive(tmp_path / "demo-dead") is False
    with RunDirectory(tmp_path, "demo-alive") as alive:
        (tmp_path / "other-dead").mkdir()  # not the prefix: never looked at
        assert reap_stale(tmp_path, "demo-") == ["demo-dead"]
        assert not (tmp_path / "demo-dead").exists() and alive.path.is_dir()
        assert reap_stale(tmp_path, "demo-") == []
    assert not alive.path.exists() and (tmp_path / "other-dead").is_dir()


def test_a_folder_without_an_owner_is_reaped_only_once_it_is_old(tmp_path):
    # an older version's folder, or one whose owner has not locked it yet (between mkdir and the lock)
    young, old = tmp_path / "demo-young", tmp_path / "demo-old"
    young.mkdir()
    old.mkdir()
    past = time.time() - UNOWNED_AGE - 1
    os.utime(old, (past, past))
    assert reap_stale(tmp_path, "demo-") == ["demo-old"]
    assert young.is_dir()


def test_a_dead_runs_ring_still_held_by_a_live_process_is_left(tmp_path):
    killed_owner(tmp_path, "demo-dead")
    ring = tmp_path / "demo-dead" / "kimiha.demo.x.MarketData"
    ring.mkdir()
    (ring / "ring").write_bytes(b"\0" * 64)
    fd = os.open(ring / "w.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a child of the dead run, still stopping
        assert reap_stale(tmp_path, "demo-", busy=distributed._rings_in_use) == []
        assert (ring / "ring").exists()
    finally:
        os.close(fd)
    assert reap_stale(tmp_path, "demo-", busy=distributed._rings_in_use) == ["demo-dead"]
    assert not (tmp_path / "demo-dead").exists()


def test_a_parent_of_another_user_or_a_symlink_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError, match="expected a directory of uid"):
        RunDirectory(tmp_path / "link", "demo-x")


def _coordinator_stops_at_once(monkeypatch, seen: list[str]) -> None:
    async def coordinate(args, url, run, delivery, token=None):
        seen.append(url)
        raise RuntimeError("the test stops here")

    monkeypatch.setattr(distributed, "_coordinate", coordinate)


def demo_args(**kw):
    return SimpleNamespace(**{"json": True, "loop": "asyncio", "data": None, "nats": None, "delivery": None,
                              "connect_timeout": None, **kw})


def test_shm_runs_reap_the_folders_of_killed_runs(tmp_path, monkeypatch, capsys):
    # before: a killed coordinator's demo-<run> folder stayed in /dev/shm for good (remove_stale looks for
    # <dir>/<subject>/ring only)
    import kimiha.bridge.shm

    monkeypatch.setattr(kimiha.bridge.shm, "default_directory", lambda: tmp_path)
    killed_owner(tmp_path, "demo-dead")
    seen: list[str] = []
    _coordinator_stops_at_once(monkeypatch, seen)
    assert distributed._main_shm(demo_args(), "kimiha demo --distributed") == 1
    assert "the test stops here" in capsys.readouterr().err
    assert len(seen) == 1 and Path(seen[0]).parent == tmp_path
    assert list(tmp_path.iterdir()) == []  # the dead run's folder and this run's own


def test_nats_runs_keep_the_store_and_configuration_in_a_folder_that_is_reaped(tmp_path, monkeypatch, capsys):
    # before: a killed coordinator left /tmp/kimiha-nats-<x> (the JetStream store) and
    # /tmp/kimiha-nats-conf-<x>/ for good
    pytest.importorskip("nats")
    store, conf = killed_owner(tmp_path, "nats-dead", nats=True)[0].split()
    assert Path(store).parent == Path(conf).parent == tmp_path / "nats-dead"
    monkeypatch.setattr(distributed, "nats_runs_directory", lambda: tmp_path)
    seen: list[str] = []
    _coordinator_stops_at_once(monkeypatch, seen)
    assert distributed.main(demo_args()) == 1
    assert "the test stops here" in capsys.readouterr().err
    assert len(seen) == 1 and seen[0].startswith("nats://127.0.0.1:")  # the server had started
    assert list(tmp_path.iterdir()) == []
