"""Messages go through ``logging``: one line each on stderr (above any progress bar), and everything, tracebacks
included, into ``<workdir>/logs/<time>-<pid>.log`` once a command knows its workdir."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

_FILE_HANDLER: logging.FileHandler | None = None


class _TqdmSafeHandler(logging.StreamHandler):
    """Writes through tqdm when a bar is showing, so a message never lands in the middle of one."""

    def emit(self, record):
        try:
            msg = self.format(record)
            if "tqdm" in sys.modules:
                from tqdm import tqdm

                tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class _Format(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        return f"warning: {msg}" if record.levelno >= logging.WARNING else msg


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``retro_pipeline`` and ``embedder`` messages to stderr, one line each (idempotent)."""
    for name in ("retro_pipeline", "embedder"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        if not any(isinstance(h, _TqdmSafeHandler) for h in logger.handlers):
            h = _TqdmSafeHandler()
            h.setLevel(level)
            h.setFormatter(_Format())
            logger.addHandler(h)
        logger.propagate = False


def attach_workdir_log(root: str | os.PathLike) -> Path | None:
    """Also log everything (DEBUG, with tracebacks) to a new file under ``<root>/logs``; returns its path."""
    global _FILE_HANDLER
    path = Path(root) / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    except OSError:
        return None
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("retro_pipeline", "embedder"):
        logger = logging.getLogger(name)
        if _FILE_HANDLER is not None:
            logger.removeHandler(_FILE_HANDLER)
        logger.addHandler(handler)
    if _FILE_HANDLER is not None:
        _FILE_HANDLER.close()
    _FILE_HANDLER = handler
    return path


def detach_workdir_log() -> None:
    """Stop logging to the workdir's file (its workdir is being removed)."""
    global _FILE_HANDLER
    if _FILE_HANDLER is not None:
        for name in ("retro_pipeline", "embedder"):
            logging.getLogger(name).removeHandler(_FILE_HANDLER)
        _FILE_HANDLER.close()
        _FILE_HANDLER = None


def current_log_file() -> str | None:
    return _FILE_HANDLER.baseFilename if _FILE_HANDLER is not None else None


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record):
        self.records.append((record.name, record.levelno, record.getMessage()))


def run_capturing_logs(fn, *args):
    """On a worker: call ``fn(*args)`` with the messages of ``retro_pipeline``/``embedder`` loggers collected
    instead of printed; returns ``(result, records)``. The driver re-emits them with :func:`replay`, so a
    worker's warning reads like the driver's own (no Ray ``(pid=...)`` prefix, through the driver's log). When
    ``fn`` raises, the records logged until then ride on the exception as ``retro_log_records``."""
    collect = _Collect()
    saved = []
    for name in ("retro_pipeline", "embedder"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers[:] = [collect]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    try:
        return fn(*args), collect.records
    except BaseException as e:  # the warnings before a failure travel with it (see replay)
        e.retro_log_records = collect.records
        raise
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)


def replay(records) -> None:
    for name, level, message in records:
        logging.getLogger(name).log(level, "%s", message)
