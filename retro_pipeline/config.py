"""Build configuration: the values of every stage's declared options, and the run options.

A workdir stores the output-changing options of every stage in ``config.json`` on its first run. A later
run may leave them out (they are read back) but may not contradict them: :func:`resolve` names the
conflicting keys. Options that don't change outputs (devices, batch sizes) and the run options (workers,
the cluster address) are never stored.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from retro_pipeline.errors import RetroError
from retro_pipeline.stage import Option, all_options

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2 (packaged)"


class Config(Mapping):
    """Every declared option's value (``cfg.chunk_length`` or ``cfg["chunk_length"]``), read-only."""

    def __init__(self, values: dict[str, Any]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no option {name!r}") from None

    def __repr__(self) -> str:
        return f"Config({self._values!r})"

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def stored(self) -> dict[str, Any]:
        """The output-changing values: what ``config.json`` keeps."""
        keys = {o.name for o in all_options() if o.changes_output}
        return {k: v for k, v in self._values.items() if k in keys}

    # conveniences over db-build's options, which every later stage reads
    def blend(self) -> list[tuple[float, str]]:
        return [(float(self.data_path[i]), self.data_path[i + 1]) for i in range(0, len(self.data_path), 2)]

    def embedder_spec(self) -> str | None:
        """The embedder as a loader takes it: None for the packaged default, else the directory or hub id."""
        return None if self.embedder == DEFAULT_EMBEDDER else self.embedder

    def split_fractions(self) -> tuple[float, float, float]:
        parts = [float(x) for x in self.split.split(",")]
        total = sum(parts)
        return tuple(p / total for p in parts)  # type: ignore[return-value]


def resolve(stored: dict[str, Any], given: dict[str, Any]) -> tuple[Config, list[str]]:
    """Merge ``given`` options over the ``stored`` ones over the declared defaults.

    Returns the config and the output-changing keys whose given value contradicts the stored one.
    """
    options = {o.name: o for o in all_options()}
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise RetroError(f"unknown option(s) {', '.join(unknown)}; see retro-pipeline build --help")
    values = {name: o.default for name, o in options.items()}
    for k, v in stored.items():
        if k in options and options[k].changes_output:
            values[k] = options[k].check(v)
    conflicts = []
    for k, v in given.items():
        if v is None:
            continue
        v = options[k].check(v)
        if options[k].changes_output and k in stored and _same(values[k]) != _same(v):
            conflicts.append(k)
        values[k] = v
    return Config(values), conflicts


def _same(v):
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------- run options


@dataclass(frozen=True)
class RunOptions:
    """How to run: never stored, never changes outputs."""

    executor: str = "ray"  # "ray" or "local"
    address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    progress: bool = True


RUN_OPTIONS = (
    Option("address", str, None, "Ray cluster address (auto, host:port, ray://host:port); none starts a local Ray.",
           changes_output=False, shown_default="a local Ray"),
    Option("executor", str, "ray", "ray: a pool of Ray actors; local: one process, no Ray (debugging).",
           changes_output=False, choices=("ray", "local")),
    Option("num_workers", int, None, "Workers in the pool.", changes_output=False, minimum=1,
           shown_default="from the cluster's CPUs/GPUs"),
    Option("cpus_per_worker", float, None, "CPUs per worker.", changes_output=False, minimum=0, open_minimum=True,
           shown_default="the stage's own, 1 for most"),
    Option("gpus_per_worker", float, None, "GPUs per worker of a GPU stage.", changes_output=False, minimum=0,
           shown_default="1 where the cluster has GPUs, else 0"),
)
RUN_KEYS = {f.name for f in fields(RunOptions)}


def run_options(values: dict[str, Any], progress: bool = True) -> RunOptions:
    by_name = {o.name: o for o in RUN_OPTIONS}
    return RunOptions(progress=progress, **{k: by_name[k].check(v) for k, v in values.items() if v is not None})


# ---------------------------------------------------------------------- config files


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON or YAML config file of stage options (keys use ``_`` for ``-``)."""
    try:
        text = open(path).read()
    except OSError as e:
        raise RetroError(f"{path}: cannot read config file ({e.strerror}); check the --config path") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except Exception as e:
        raise RetroError(f"{path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                         f"({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(d, dict):
        raise RetroError(f"{path}: a config file must hold a mapping of option names to values")
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = set(d) - {o.name for o in all_options()} - RUN_KEYS
    if unknown:
        raise RetroError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}; see retro-pipeline build --help")
    return d
