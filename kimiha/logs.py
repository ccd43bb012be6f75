"""Logging: structured fields on kimiha's records, readable lines when nobody configured logging, a JSON format.

* Records about a task or a channel carry them as attributes ``task`` and ``channel`` (``extra=fields(...)``),
  so a JSON handler or a filter can use them without parsing the message.
* A process that configured no logging gets ``12:00:01.234 WARNING kimiha.scheduler: ...`` lines on stderr
  (Python's own last resort prints the bare message). This comes from one handler on the ``kimiha`` logger that
  stands aside as soon as any other handler would take the record: ``logging.basicConfig`` or an application's
  own handlers win, and nothing here touches the root logger at import.
* :func:`configure` is for applications (the CLI): one stderr handler on the root logger, text or JSON lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from typing import Any, TextIO

__all__ = ["FIELDS", "FORMATS", "JsonFormatter", "TextFormatter", "configure", "fields", "install_fallback",
           "json_handler", "log_traceback"]

#: The structured fields kimiha's records may carry.
FIELDS = ("task", "channel")
#: The values of ``--log-format``.
FORMATS = ("text", "json")

_TEXT_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
_TEXT_DATEFMT = "%H:%M:%S"

# What every LogRecord has: anything else on a record came from ``extra=`` and goes into the JSON line.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def fields(task: str | None = None, channel: Any = None) -> dict[str, Any]:
    """Return the ``extra=`` mapping of a record about ``task`` and/or ``channel`` (a channel's name or key)."""
    out: dict[str, Any] = {}
    if task is not None:
        out["task"] = task
    if channel is not None:
        value = getattr(channel, "value", channel)
        out["channel"] = value if isinstance(value, str) else str(channel)
    return out


def safe_repr(obj: Any, limit: int = 200) -> str:
    """``repr(obj)`` cut to ``limit`` characters, or a placeholder naming the type when ``repr`` raises: what
    error messages and log lines show of an event or payload, which must never fail themselves."""
    try:
        text = repr(obj)
    except Exception as exc:           # a broken __repr__ must not take the report of the real failure with it
        return f"<{type(obj).__qualname__} object (its repr raised {type(exc).__name__})>"
    return text if len(text) <= limit else text[:limit]


def log_traceback(logger: logging.Logger, level: int, exc: BaseException, msg: str, *args: Any,
                  extra: dict[str, Any] | None = None) -> None:
    """Log ``msg % args`` with ``exc``'s traceback as the record's exception text (``exc_text``).

    Formatters show it as they show ``exc_info`` (below a text line; the ``exception`` field of a JSON line),
    but the record holds text, not the exception: a record keeping a live traceback would keep every frame of
    the failing call alive in any handler that retains records. Nothing is formatted when the record would not
    be emitted at ``level``.
    """
    if not logger.isEnabledFor(level):
        return
    frame = sys._getframe(1)
    record = logger.makeRecord(logger.name, level, frame.f_code.co_filename, frame.f_lineno, msg, args, None,
                               frame.f_code.co_name, extra)
    record.exc_text = "".join(traceback.format_exception(exc)).rstrip()
    logger.handle(record)


class TextFormatter(logging.Formatter):
    """``HH:MM:SS.mmm LEVEL logger: message`` (with the traceback, if any, below)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__(prefix + _TEXT_FORMAT, _TEXT_DATEFMT)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the structured
    fields (``task``, ``channel``, anything else given with ``extra=``) and ``exception`` when there is one."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON; never raises (a bad record still gives a JSON line)."""
        try:
            message = record.getMessage()
        except Exception as exc:  # msg % args failed (a caller's bug): say so, keep the pieces
            message = f"{record.msg!r} % {record.args!r} failed: {type(exc).__name__}: {exc}"
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            **self.static,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        out.update(getattr(record, "_kimiha_fields", None) or {})  # fields named like a LogRecord attribute
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        try:
            return json.dumps(out, default=_text, ensure_ascii=False)
        except (ValueError, TypeError, RecursionError):  # a circular value, a key that is not a string, ...
            return json.dumps({k: v if isinstance(v, (str, int, float, bool, type(None))) else _text(v)
                               for k, v in out.items()}, ensure_ascii=False)


def _text(value: Any) -> str:
    """A value JSON cannot hold, as text: its ``str()``, or its type when even that fails."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__} that cannot be shown>"


class _Fallback(logging.Handler):
    """Writes kimiha's records to stderr only when no other handler on their way up would take them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)  # what Python's last resort shows
        self.setFormatter(TextFormatter())

    def _others_take(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            for handler in logger.handlers:
                if handler is not self and record.levelno >= handler.level:
                    return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False

    def emit(self, record: logging.LogRecord) -> None:
        if self._others_take(record):
            return
        try:
            stream = sys.stderr  # looked up now: a test or an application may have replaced it
            if stream is None:
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler on whatever ``sys.stderr`` is when a record is written, not the stream it was when the
    handler was made: a test harness or an application that replaces ``sys.stderr`` later (and closes the old
    one) still gets the lines, and nothing writes to a closed file (a ``sys.stderr`` closed and not replaced
    takes no lines: they are dropped rather than raised into the code that logged)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        if stream is None or getattr(stream, "closed", False):
            return  # nowhere to write (closed, not replaced): dropped, not raised into the caller
        self.stream = stream
        super().emit(record)

    def flush(self) -> None:
        stream = sys.stderr
        if stream is not None and not getattr(stream, "closed", False):
            self.stream = stream
            super().flush()


def install_fallback() -> None:
    """Put the stand-aside stderr handler on the ``kimiha`` logger (once; :mod:`kimiha` does it at import)."""
    logger = logging.getLogger("kimiha")
    if not any(isinstance(h, _Fallback) for h in logger.handlers):
        logger.addHandler(_Fallback())


def json_handler() -> logging.Handler | None:
    """Return the JSON handler :func:`configure` installed on the root logger, or None (text, or not used)."""
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_kimiha_configured", False) and isinstance(handler.formatter, JsonFormatter):
            return handler
    return None


def configure(fmt: str = "text", level: int | str = logging.WARNING, *, stream: TextIO | None = None,
              prefix: str = "", static: dict[str, Any] | None = None) -> logging.Handler:
    """Set up logging for an application: one handler on the root logger, ``fmt`` ``"text"`` or ``"json"``.

    Replaces the handlers this function installed before (not anybody else's). ``prefix`` starts each text
    line (the distributed demo's ``[feed] ``); ``static`` adds fixed keys to each JSON line. Returns the handler.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_kimiha_configured", False)]:
        root.removeHandler(old)
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(JsonFormatter(static) if fmt == "json" else TextFormatter(prefix))
    handler._kimiha_configured = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    return handler
