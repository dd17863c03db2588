"""The stage protocol: plan deterministic blocks, process one block, finalize once.

Stages don't orchestrate: executors (``retro_pipeline.executor``) own markers, retries, progress and logs,
and the local and Ray executors run the same stage code. A stage object holds only plain data (config and
paths) so it pickles to workers; whatever is costly to build (tokenizers, models) comes from ``setup``,
called once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Block:
    """One unit of work and of resume: rows ``[start, end)`` of something, written to ``path``."""

    name: str  # unique within its stage, e.g. "corpus/000000-100000"
    start: int
    end: int
    path: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

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


class Stage:
    """Base class of a pipeline stage. Subclasses set ``name`` and implement the methods below."""

    name: str = "stage"
    unit: str = "rows"  # what Block.size counts, for progress bars
    num_cpus: float = 1.0  # default resources of one worker
    num_gpus: float = 0.0

    def prepare(self) -> None:
        """Check inputs on the driver before anything is written (raise RetroError on bad input)."""

    def check(self) -> None:
        """Run :meth:`prepare` once, however many callers ask."""
        if not self.__dict__.get("_checked"):
            self.prepare()
            self._checked = True

    def plan(self) -> list[Block]:
        raise NotImplementedError

    def output_dirs(self) -> list[Path]:
        """Directories this stage writes (swept for temporaries at start; removed by --force)."""
        return []

    def final_outputs(self) -> list[Path]:
        """Files written by ``finalize`` (removed by --force)."""
        return []

    def setup(self, resources: dict[str, Any]) -> Any:
        """Build per-worker state once (tokenizers, a model). ``resources`` says the worker's CPUs/GPUs."""
        return None

    def process(self, block: Block, state: Any) -> dict[str, Any]:
        """Write ``block.path`` atomically and return its counts (JSON-serialisable)."""
        raise NotImplementedError

    def finalize(self, blocks: list[Block], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Combine the finished blocks once; ``results`` maps block name → its marker. Return a summary."""
        return {}
