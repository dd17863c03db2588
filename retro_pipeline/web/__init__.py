"""``retro-pipeline serve``: a local, read-only web app over a workdir (search, chunks, samples, status).

:func:`create_app` builds the Flask app; :mod:`.browse` reads the workdir for it; ``retro_pipeline.cli_serve``
serves it with waitress. Importing this package imports neither Flask nor torch.
"""


def create_app(workdir, allow_changed: bool = False, load: bool = True, warn=None):
    """The Flask app over ``workdir`` (see :func:`retro_pipeline.web.app.create_app`)."""
    from retro_pipeline.web.app import create_app as make

    return make(workdir, allow_changed, load, warn)
