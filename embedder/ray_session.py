"""Joining Ray, the one way for both packages (the pipeline's executor and the trainer): reuse a running
session, join a cluster (``auto`` follows the cluster `ray start` recorded on this machine; a dead address
fails in seconds instead of Ray's minutes of retries; this machine's auth token is sent), or start a local
Ray; and keep Ray's forwarded chatter that means nothing to a user off the terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Any

from embedder.errors import UserError


def ensure_ray(address: str | None = None, num_cpus: int | None = None, object_store_memory: int | None = None):
    """Return the ``ray`` module, connected: reuse a running session, join ``address`` (or ``RAY_ADDRESS``, as
    set inside a `ray job submit` job), or start a new local Ray."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        drop_ray_noise()
        return sys.modules["ray"]
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        _check_reachable(_follow_auto(address) if address == "auto" else address, address)
        _send_token_if_we_have_one()
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # errors are reported once, by the executor
    # Ray >= 2.59 warns at every local start that it enabled token authentication: not ours to act on.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    import ray

    if ray.is_initialized():
        drop_ray_noise()
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": True,
                          "logging_level": "warning"}
    with _keep_sigterm_handler():
        if not address:  # "local": never attach to whatever cluster this machine last ran
            # idle worker processes are kept a minute (Ray's default: a second) so that the next stage's tasks
            # find them with torch and transformers imported (see _task_process)
            ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory,
                     _system_config={"idle_worker_killing_time_threshold_ms": 60_000}, **kw)
        else:
            try:
                ray.init(address=address, **kw)
            except ConnectionError as e:
                raise UserError(f"--address {address}: cannot connect to a Ray cluster ({e}); check the address "
                                 f"(auto, host:port or ray://host:port) and, for a cluster with token "
                                 f"authentication, RAY_AUTH_TOKEN; or leave --address out to run locally") from None
    drop_ray_noise()
    return ray


# Lines Ray forwards to the driver that say nothing to a user of this project:
# - the GCS logs an error when it kills an actor whose worker process is already going (the executor kills its
#   pool after every stage, also after a failed one): harmless, and it would land under our own one-line error;
# - Ray Train's placement-group cleaner asks the state API (a dashboard process, which is not started) about
#   its controller every few seconds, and its controller logs an internal actor's restart setting as an error.
_GCS_NOISE = re.compile(r"Failed to kill actor|KillActor RPC failed")
_TRAIN_NOISE = re.compile(r"Failed to query Ray Train Controller actor state|"
                          r"'PreemptionWatcher'.*constructor arguments in the object store")


def drop_ray_noise() -> None:
    """Wrap Ray's handler that prints forwarded worker/system log lines so that it skips the lines above
    (``_GCS_NOISE``, ``_TRAIN_NOISE``); every other line (worker output, raylet errors) is printed as before. This reaches
    into Ray's private log dispatcher (tested with Ray 2.60): where a release lays it out otherwise, lines
    are printed as Ray prints them, and the command goes on."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        lock, handlers = dispatcher._lock, dispatcher.handlers
        if not all(isinstance(h, tuple) and len(h) == 2 for h in handlers):
            return
    except Exception:  # another Ray layout
        return

    def wrap(handler):
        if getattr(handler, "_drops_ray_noise", False):
            return handler

        def filtered(data):
            try:
                gcs = data.get("pid") == "gcs_server"
                if "PlacementGroupCleaner" in str(data.get("actor_name") or data.get("task_name") or ""):
                    return   # Ray Train's cleaner: state-API polls, and a traceback when Ray stops under it
                lines = [ln for ln in data.get("lines", ())
                         if not _TRAIN_NOISE.search(ln) and not (gcs and _GCS_NOISE.search(ln))]
                if not lines:
                    return
                data = {**data, "lines": lines}
            except Exception:  # a record of another shape: print it as it is
                pass
            handler(data)

        filtered._drops_ray_noise = True
        return filtered

    try:
        with lock:
            dispatcher.handlers = [(n, wrap(h) if n == "ray_print_logs" else h) for n, h in dispatcher.handlers]
    except Exception:
        return


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init installs a fatal-signal handler that prints stack lines on SIGTERM; keep the caller's own."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(previous):
            signal.signal(signal.SIGTERM, previous)


def cluster_file() -> str:
    """Where `ray start --head` records the cluster it started (under RAY_TMPDIR, as Ray itself reads it)."""
    return os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp/ray", "ray_current_cluster")



CONNECT_TIMEOUT_S = 5.0


def _follow_auto(address: str) -> str:
    """The host:port that ``--address auto`` means: the one `ray start` last wrote on this machine."""
    try:
        with open(cluster_file()) as f:
            found = f.read().strip()
    except OSError:
        found = ""
    if not found:
        raise UserError(f"--address auto: no Ray cluster was started on this machine ({cluster_file()} is "
                         f"missing); start one with 'ray start --head', give host:port, or leave --address "
                         f"out to run locally")
    return found


def _check_reachable(address: str, given: str) -> None:
    """Fail fast on a host:port where nothing listens (ray.init would retry for minutes)."""
    import socket

    if ":" not in address:
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        where = f" (the cluster recorded in {cluster_file()}, which a stopped cluster leaves behind)" \
            if given == "auto" else ""
        raise UserError(f"--address {given}: no Ray cluster answers at {address}{where} ({e}); start one with "
                         f"'ray start --head', check host and port, or leave --address out to run locally") from None


def _send_token_if_we_have_one() -> None:
    """A cluster started with `ray start` checks a token by default (Ray >= 2.59) that a driver sends only with
    RAY_AUTH_MODE=token, read when ray is imported: when this machine has a token and no mode is chosen, send it."""
    token_here = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
        os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    if token_here and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
