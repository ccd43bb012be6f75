"""A child process for tests/test_shm.py: a writer or a reader of one shared-memory ring.

    python tests/shm_child.py writer DIR SUBJECT N [PAUSE_EVERY]   publish Tick 1..N, then wait for "stop" on stdin
    python tests/shm_child.py reader DIR SUBJECT [DURABLE]         print each handled Tick's seq until "stop"

Each prints ``ready`` once its scheduler runs; a reader prints ``seq <n>`` per handled event (flushed per line),
a writer ``sent <n>`` every PAUSE_EVERY events (pausing 2 ms there, so that a test can kill it mid-stream) and
``done`` at the end; both print ``stats <json>`` after a clean stop.
"""

from __future__ import annotations

import asyncio
import json
import sys

from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Overflow, Scheduler
from kimiha.bridge import ShmBridge


class Ev(EventType):
    MD = "MD"


class Tick(Event, frozen=True):
    seq: int
    price: float


class Print(EventTask):
    def subscribed_event(self) -> Ev:
        return Ev.MD

    def handle_event(self, event: Tick) -> None:
        sys.stdout.write(f"seq {event.seq}\n")
        sys.stdout.flush()


async def stdin_stop() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == b"stop":
            return


async def main(argv: list[str]) -> None:
    role, directory, subject = argv[:3]
    bus = EventBus([(Ev.MD, ChannelConfig(256, payload_type=Tick, overflow=Overflow.BLOCK))])
    scheduler = Scheduler(bus, name=f"shm-{role}")
    bridge = ShmBridge(bus, directory, name=role, liveness_interval=0.05)
    if role == "writer":
        n = int(argv[3])
        pause_every = int(argv[4]) if len(argv) > 4 else 0
        exporter = bridge.export_channel(Ev.MD, subject, capacity=1024)
    else:
        bridge.import_channel(Ev.MD, subject, durable=argv[3] if len(argv) > 3 else None, capacity=1024)
        scheduler.register_event_task(Print())
    bridge.register(scheduler)
    await scheduler.start()
    print("ready", flush=True)
    if role == "writer":
        for i in range(1, n + 1):
            await bus.publish_async(Ev.MD, Tick(i, 100.0 + i))
            if pause_every and i % pause_every == 0:
                assert await bridge.flush(20.0)
                print(f"sent {i}", flush=True)
                await asyncio.sleep(0.002)
        assert await bridge.flush(20.0)
        print(f"done {exporter.last_seq}", flush=True)
    await stdin_stop()
    await scheduler.shutdown()
    print("stats " + json.dumps(bridge.stats(), default=str), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
