"""The stage protocol and its declarations: plan deterministic blocks, process one block, finalize once.

A stage is a :class:`Stage` subclass that declares what it is: its ``name`` (the CLI subcommand and the
``status`` row), the stages it ``needs``, its own :class:`Option` s (and which of them change its outputs),
and its :class:`Resources`. Everything around it comes from those declarations: the pipeline order, the
CLI subcommand with its options and help, the keys of ``config.json``, the stage's fingerprint (its
output-changing options plus its upstream stages' fingerprints) and its ``status`` line. A new stage is
one new module in ``retro_pipeline/stages/`` (every :class:`Stage` subclass defined there is found), or
an entry point in the ``retro_pipeline.stages`` group for a stage that lives in another package.

Stages don't orchestrate: executors (``retro_pipeline.executor``) own markers, retries, progress and logs,
and the local and Ray executors run the same stage code. A stage object holds only plain data (the
workdir, the config and run options) so it pickles to workers; whatever is costly to build (tokenizers,
models) comes from ``setup``, called once per worker.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from embedder.options import Option as DeclaredOption
from retro_pipeline.errors import RetroError

if TYPE_CHECKING:
    from retro_pipeline.config import Config
    from retro_pipeline.workdir import Workdir


# ---------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Option(DeclaredOption):
    """One option of a stage (:class:`embedder.options.Option`): a CLI flag, a config-file key and (if
    ``changes_output``) a ``config.json`` key. A bad value is a :class:`RetroError`."""

    error: ClassVar[type[Exception]] = RetroError


@dataclass(frozen=True)
class Service:
    """One service of a stage (:meth:`Stage.services`): ``factory(*args)`` builds the object whose methods
    workers call; ``memory`` (bytes) places it on a node that can hold it. ``optional``: the workers can do
    the work themselves (slower), so services the cluster cannot hold are skipped with a warning instead of
    failing the stage."""

    name: str
    factory: Callable[..., Any]
    args: tuple = ()
    memory: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks for. ``gpus`` is asked only where the cluster has GPUs;
    ``max_per_node`` caps the workers placed on one node (e.g. to share one memory-mapped index)."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory: int | None = None  # bytes; None = no reservation
    max_per_node: int | None = None
    whole_node: bool = False  # cpus = every CPU of the largest alive node (one-off jobs such as training)


# ---------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One unit of work and of resume: rows ``[start, end)`` of something, written to ``paths``.

    A block may own several files; it is done when its marker exists and every file has the size the
    marker records. ``path`` is the first (for blocks of one file, the only) file.
    """

    name: str  # unique within its stage, e.g. "corpus/000000-100000"
    start: int
    end: int
    paths: tuple[str, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if isinstance(self.paths, (str, os.PathLike)):
            object.__setattr__(self, "paths", (str(self.paths),))
        else:
            object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))

    @property
    def path(self) -> str:
        return self.paths[0]

    @property
    def size(self) -> int:
        return self.end - self.start


def block_ranges(n: int, block_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + block_size, n)) for s in range(0, n, block_size)]


def rows_per_block(n: int, block_size: int, floor: int, target_blocks: int = 64) -> int:
    """``block_size``, lowered for small inputs so that they still split into about ``target_blocks`` blocks
    (never below ``floor`` rows) and spread over workers. Depends only on the input size and the config."""
    return max(1, min(block_size, max(floor, -(-n // target_blocks))))


def block_file_name(start: int, end: int, n_total: int) -> str:
    """Megatron's block name: both ends zero-filled to the width of the largest index."""
    width = len(str(n_total))
    return "%s-%s.hdf5" % (str(start).zfill(width), str(end).zfill(width))


# ---------------------------------------------------------------------- the stage


class Stage:
    """Base class of a pipeline stage: set the class attributes, implement ``plan``/``process`` (and
    optionally ``prepare``, ``setup``, ``finalize``, ``outputs``, ``input_files``).

    The first line of the class docstring is the subcommand's one-line help; the rest is its ``--help``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[Option, ...]] = ()
    resources: ClassVar[Resources] = Resources()  # each block worker
    once_resources: ClassVar[Resources] = Resources()  # the one-off job (finalize): e.g. a whole node to train
    unit: ClassVar[str] = "rows"  # what Block.size counts, for progress bars
    group: ClassVar[str | None] = None  # a CLI command that runs every stage of the group (index-build)

    def __init__(self, workdir: "Workdir", cfg: "Config", cpus: float | None = None, gpus: float | None = None):
        self.workdir = workdir
        self.cfg = cfg
        # the stages this run rebuilds (--force, --redo): their outputs in the workdir are about to go, so
        # validate() must not judge the options by them
        self.rebuilding: frozenset[str] = frozenset()
        # the worker shape, where the run overrides the declaration (--cpus-per-worker, --gpus-per-worker)
        self.cpus = cpus
        self.gpus = gpus

    # ---- driver side
    def validate(self) -> None:
        """Every check of the options that can run before --force deletes anything (raise RetroError): of the
        options alone, or against upstream outputs that stay (not in ``self.rebuilding``)."""

    def prepare(self) -> None:
        """Check inputs on the driver before anything is written (raise RetroError on bad input)."""

    def check(self) -> None:
        """Run :meth:`prepare` once, however many callers ask."""
        if not self.__dict__.get("_checked"):
            self.prepare()
            self._checked = True

    def plan(self) -> list[Block]:
        raise NotImplementedError

    def outputs(self) -> list[Path]:
        """Every file and directory this stage writes: swept for temporaries at start, removed by --force,
        and a done stage whose outputs are missing is run again."""
        return []

    def final_outputs(self) -> list[Path]:
        """The files of ``outputs`` that ``finalize`` writes (checked to exist before 'already done')."""
        return []

    def input_files(self) -> list[Path]:
        """Files outside the workdir that this stage reads: recorded at the first run and checked later."""
        return []

    # ---- worker side
    def setup(self, resources: dict[str, Any]) -> Any:
        """Build per-worker state once (tokenizers, a model). ``resources`` says the worker's CPUs/GPUs."""
        return None

    def process(self, block: Block, state: Any) -> dict[str, Any]:
        """Write the block's files atomically and return its counts (JSON-serialisable)."""
        raise NotImplementedError

    def groups(self, blocks: list[Block]) -> list[list[Block]]:
        """The units of dispatch: runs of consecutive planned blocks that one worker processes in one call
        (:meth:`process_group`), e.g. so that an encoder sorts all their texts by length at once. A pure
        function of the plan and the config (never of the worker count), so that outputs do not depend on
        how many workers ran; where some of a group's blocks are done, the others are made with the group as
        it was planned (``todo`` of :meth:`process_group`). One block each by default."""
        return [[b] for b in blocks]

    def process_group(self, blocks: list[Block], state: Any, todo: list[Block] | None = None) -> list[dict[str, Any]]:
        """Process a group of blocks (see :meth:`groups`): write the files of ``todo`` (a sub-list; None = all)
        and return their counts, in order. A stage that computes across the group (one embedding pool)
        computes it whole, so that a block made in a resumed run has the bytes it would have had."""
        return [self.process(b, state) for b in (blocks if todo is None else todo)]

    def run_record(self, state: Any) -> dict[str, Any]:
        """How a worker made its blocks beyond the stored config, as run options (``--batch-size``, ...) that
        change outputs only at float precision: recorded in each block's marker, for ``verify``."""
        return {}

    def bar_label(self) -> str:
        """The progress bar's label: the stage's name, and what its blocks do where that is not the stage's job."""
        return self.name

    def finalize_note(self) -> str | None:
        """What finalize does, said on the driver before it starts where it takes a while (no bar shows it)."""
        return None

    #: handles of the services this stage asked for (:meth:`services`), set by an executor that runs them
    #: while its blocks run; None otherwise (the stage then does the work in its own workers)
    service_handles: list | None = None

    def services(self) -> list["Service"]:
        """Long-lived helpers the stage's workers call while its blocks run (e.g. one searcher per index
        shard), run by the Ray executor as actors placed by the memory they declare; the local executor runs
        none. Workers reach them through ``self.service_handles`` (``handle.call.remote(method, *args)``)."""
        return []

    def finalize_jobs(self, blocks: list[Block], results: dict[str, dict[str, Any]]) -> list[tuple[str, Any, tuple]]:
        """One-off jobs that run before :meth:`finalize`, each on its own worker with ``once_resources`` and in
        parallel where the cluster has room (on a cluster: on different nodes), as ``(what, fn, args)`` with
        ``fn`` a module-level function. Each writes its outputs atomically (a rerun after a kill is a resume)."""
        return []

    def finalize(self, blocks: list[Block], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Combine the finished blocks once, as a one-off job on a worker with ``once_resources``;
        ``results`` maps block name → its marker. Return a summary (JSON-serialisable)."""
        return {}

    # ---- declarations, derived
    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or cls.name).strip().splitlines()[0]

    @classmethod
    def output_keys(cls) -> tuple[str, ...]:
        return tuple(o.name for o in cls.options if o.changes_output)


def fingerprint(stage_cls: type[Stage], cfg: "Config", upstream: dict[str, str]) -> str:
    """A hash of what a stage's outputs depend on: its output-changing options and its needs' fingerprints."""
    d = {"stage": stage_cls.name, "options": {k: cfg[k] for k in sorted(stage_cls.output_keys())},
         "needs": {n: upstream[n] for n in stage_cls.needs}}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- the registry

_extra: dict[str, type[Stage]] = {}  # stages registered at run time (register())
_found: dict[str, type[Stage]] | None = None


def register(stage_cls: type[Stage]) -> type[Stage]:
    """Add a stage defined outside ``retro_pipeline/stages/`` (usable as a class decorator)."""
    _check_declaration(stage_cls)
    _extra[stage_cls.name] = stage_cls
    return stage_cls


def unregister(name: str) -> None:
    _extra.pop(name, None)


def _check_declaration(cls: type[Stage]) -> None:
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name:
        raise TypeError(f"{cls.__qualname__}: a stage needs a lower-case name without spaces")
    if len({o.name for o in cls.options}) != len(cls.options):
        raise TypeError(f"stage {cls.name}: two options share a name")


def _discover() -> dict[str, type[Stage]]:
    global _found
    if _found is None:
        import importlib
        import pkgutil

        import retro_pipeline.stages as pkg

        found: dict[str, type[Stage]] = {}
        for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
            for obj in vars(module).values():
                if isinstance(obj, type) and issubclass(obj, Stage) and obj.__module__ == module.__name__ \
                        and obj.name:
                    _check_declaration(obj)
                    found[obj.name] = obj
        from importlib.metadata import entry_points

        for ep in entry_points(group="retro_pipeline.stages"):
            cls = ep.load()
            _check_declaration(cls)
            found[cls.name] = cls
        _found = found
    return _found


def all_stages() -> list[type[Stage]]:
    """Every stage, in pipeline order: each after the stages it needs (ties in name order)."""
    stages = {**_discover(), **_extra}
    options: dict[str, tuple[str, Option]] = {}
    for cls in stages.values():
        for n in cls.needs:
            if n not in stages:
                raise TypeError(f"stage {cls.name} needs '{n}', which no stage declares")
        for o in cls.options:  # stages may share one Option object (e.g. the embedding device)
            first, decl = options.setdefault(o.name, (cls.name, o))
            if decl is not o:
                raise TypeError(f"option {o.flag} is declared by both {first} and {cls.name}")
    order: list[type[Stage]] = []
    placed: set[str] = set()
    while len(order) < len(stages):
        ready = sorted(n for n, c in stages.items() if n not in placed and all(d in placed for d in c.needs))
        if not ready:
            raise TypeError(f"stages {', '.join(sorted(set(stages) - placed))} need each other in a cycle")
        # the first ready stage, so that a chain of needs stays together in order
        order.append(stages[ready[0]])
        placed.add(ready[0])
    return order


def all_options() -> list[Option]:
    """Every declared option once (an option shared by several stages is listed once)."""
    return list({o.name: o for cls in all_stages() for o in cls.options}.values())


def owners(option: str) -> list[str]:
    """The stages that declare ``option``."""
    return [cls.name for cls in all_stages() if any(o.name == option for o in cls.options)]


def downstream_of(names) -> set[str]:
    """``names`` and every stage that needs one of them, directly or through others."""
    out = set(names)
    for cls in all_stages():  # pipeline order: a stage comes after its needs
        if any(n in out for n in cls.needs):
            out.add(cls.name)
    return out
