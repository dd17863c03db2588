"""``retro-pipeline serve``: the workdir's web app (:mod:`retro_pipeline.web`) on waitress, a threaded WSGI server."""

from __future__ import annotations

import errno
import ipaddress
import socket

import click

from retro_pipeline.errors import RetroError


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(app, host: str, port: int, threads: int):
    """A waitress server bound to ``host:port`` (not serving yet); a bad host or a busy port is one line."""
    from waitress.server import create_server

    try:
        return create_server(app, host=host, port=port, threads=threads, ident="retro-pipeline")
    except (socket.gaierror, ValueError):   # waitress: "Invalid host/port specified" where the name resolves to none
        raise RetroError(f"--host {host}: not an address or host name this machine resolves; give an IP address "
                         f"of it, e.g. 127.0.0.1") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RetroError(f"--port {port}: something already listens on {host}:{port}; pass another --port "
                             f"(or stop what holds it)") from None
        if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise RetroError(f"--host {host}: not an address of this machine ({e.strerror}); give one it has, "
                             f"e.g. 127.0.0.1") from None
        if e.errno == errno.EACCES:
            raise RetroError(f"--port {port}: not allowed to listen there ({e.strerror}); ports below 1024 need "
                             f"privileges, pass e.g. --port 8000") from None
        raise RetroError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@click.command()
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False),
              help="The build to serve (db-build and index-add done; samples need query-neighbors).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but a loopback address lets other machines read the workdir's "
                   "texts (there is no login).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port (0: any free one, printed).")
@click.option("--threads", type=click.IntRange(min=1), default=8, show_default=True,
              help="Requests answered at once.")
@click.option("--allow-changed", is_flag=True,
              help="Serve it even where 'retro-pipeline status' calls it stale (a corpus or tokenizer file changed "
                   "since it was built), with a warning on every page; without it that is an error.")
def serve(workdir, host, port, threads, allow_changed):
    """A local web page over a built workdir: search the chunk database with free text, read a chunk with its
    continuation and document neighbours, a pretraining sample with each chunk beside its saved neighbors, and
    the stage status and the build report.

    \b
    retro-pipeline serve --workdir W                 then open http://127.0.0.1:8000/
    GET /?q=TEXT&k=10, /api/search?q=TEXT&k=10 (JSON), /chunk/ID, /api/chunk/ID, /sample/SPLIT/I, /status,
    /report

    Read-only. The query is embedded with the build's own encoder and searched with the index's tuned settings;
    the encoder and the index are loaded once, at start. Ctrl-C stops it.
    """
    import logging

    from retro_pipeline.web import create_app
    from retro_pipeline.web.browse import Browser

    browser = Browser(workdir, allow_changed, warn=logging.getLogger(__name__).warning)  # a bad workdir: here
    app = _Later()
    server = make_server(app, host, port, threads)   # a busy port or a bad host: here, before the slow load
    if not is_loopback(host):
        click.echo(f"warning: --host {host} is not a loopback address: every machine that reaches it can read this "
                   f"workdir's texts (there is no login); use --host 127.0.0.1 to keep it on this machine", err=True)
    try:
        click.echo("loading the encoder and the index ...", err=True)
        app.app = create_app(browser)
        where = getattr(server, "effective_host", host), getattr(server, "effective_port", port)
        click.echo(f"serving {browser.workdir.root} on http://{_url_host(where[0])}:{where[1]}/ (Ctrl-C stops it)",
                   err=True)
        server.run()   # returns on Ctrl-C (waitress closes its sockets then)
        click.echo("stopped", err=True)
    except KeyboardInterrupt:   # Ctrl-C while loading
        click.echo("stopped", err=True)
    except BaseException as e:
        if not isinstance(e, (Exception, SystemExit)):   # SIGTERM: the CLI says so, with these words after it
            e.resume_hint = "the server stopped (the same command starts it again)"
        raise
    finally:
        server.close()


class _Later:
    """The WSGI app, set once loaded: the socket is bound first, so that a busy port is an error at once."""

    app = None

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
