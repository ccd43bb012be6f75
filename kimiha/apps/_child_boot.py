"""The first lines a process of the distributed demo runs (``python -P .../_child_boot.py --role ...``).

Run as a script, by path, so that nothing of kimiha is imported before the stop signals are caught: the imports
take about a second, and a SIGTERM or SIGINT in that second is recorded here and replayed once the child's
event loop takes signals (``kimiha.apps.distributed._child``). Before, it ended the child by the signal's
default action, with nothing reported. (A signal during the interpreter's own start, the first ~20 ms, still
does.)
"""

import signal
import sys
from types import FrameType

early: list[str] = []


def _early(signum: int, frame: FrameType | None) -> None:
    early.append(signal.Signals(signum).name)


if __name__ == "__main__":
    for _signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_signum, _early)
    from kimiha.apps.distributed import _child_main

    sys.exit(_child_main(sys.argv[1:], early))
