"""The click option of a declared option (:class:`retro_pipeline.stage.Option`): one rule for every command
that shows stage options (the stage commands, ``verify``)."""

from __future__ import annotations

from typing import Any

import click

from retro_pipeline.stage import Option


def click_option(o: Option) -> click.Option:
    """The CLI flag of a declared option; it defaults to None so that 'not given' stays visible."""
    kw: dict[str, Any] = {"default": None}
    if o.type is bool:
        kw["is_flag"] = True
    elif o.choices is not None:
        kw["type"] = click.Choice(o.choices)
    elif o.type is int:
        kw["type"] = click.IntRange(min=o.minimum, min_open=o.open_minimum, max=o.maximum) \
            if o.minimum is not None or o.maximum is not None else int
    elif o.type is float:
        kw["type"] = click.FloatRange(min=o.minimum, min_open=o.open_minimum, max=o.maximum) \
            if o.minimum is not None or o.maximum is not None else float
    shown = o.shown_default if o.shown_default is not None else \
        (None if o.default is None or o.default is False else str(o.default))   # a flag is off unless given
    help_ = o.help + (f" [default: {shown}]" if shown else "")
    return click.Option([o.flag], help=help_, **kw)
