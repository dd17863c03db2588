"""Build configuration: frozen dataclasses, defaults, validation and the keys that change outputs.

A workdir stores the output-changing keys in ``config.json`` on its first run. A later run may leave
them out (they are read back) but may not contradict them: :func:`retro_pipeline.workdir.Workdir.resolve`
names the conflicting keys. Run options (workers, devices, batch sizes, the cluster address) never change
outputs and are never stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

from retro_pipeline.errors import RetroError

SPLIT_MODES = ("random", "megatron")
POOLINGS = ("cls", "mean", "mean-no-special")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2 (packaged)"


@dataclass(frozen=True)
class BuildConfig:
    """Everything that decides what a build writes. Field names are the config-file keys."""

    data_path: tuple[str, ...] = ()  # Megatron style: ("w1", "/abs/prefix1", "w2", "/abs/prefix2", ...)
    gpt_tokenizer: str = ""
    embedder: str = DEFAULT_EMBEDDER
    pooling: str = ""  # "" = the model's own, else mean
    chunk_length: int = 64
    split: str = "98,2,0"
    split_mode: str = "random"
    seed: int = 1234
    index_ntrain: str = "auto"  # "auto" or an integer count, kept as text
    block_size: int = 100000
    embed_dtype: str = "float32"  # on-disk dtype of stored embedding blocks (float32 or float16)

    def blend(self) -> list[tuple[float, str]]:
        return [(float(self.data_path[i]), self.data_path[i + 1]) for i in range(0, len(self.data_path), 2)]

    def embedder_spec(self) -> str | None:
        """The embedder as a loader takes it: None for the packaged default, else the directory or hub id."""
        return None if self.embedder == DEFAULT_EMBEDDER else self.embedder

    def split_fractions(self) -> tuple[float, float, float]:
        parts = [float(x) for x in self.split.split(",")]
        total = sum(parts)
        return tuple(p / total for p in parts)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_path"] = list(self.data_path)
        return d

    def fingerprint(self, keys: tuple[str, ...] | None = None) -> str:
        d = self.to_dict()
        if keys is not None:
            d = {k: d[k] for k in keys}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Which config keys each stage's outputs depend on (directly or through an earlier stage).
DB_KEYS = ("data_path", "gpt_tokenizer", "embedder", "chunk_length", "split", "split_mode", "seed",
           "index_ntrain", "block_size")
EMBED_KEYS = DB_KEYS + ("pooling", "embed_dtype")
STAGE_KEYS: dict[str, tuple[str, ...]] = {"db-build": DB_KEYS, "embed-sampled": EMBED_KEYS}


def affected_stages(keys) -> list[str]:
    return [s for s, ks in STAGE_KEYS.items() if any(k in ks for k in keys)]


@dataclass(frozen=True)
class RunOptions:
    """How to run: never stored, never changes outputs."""

    executor: str = "ray"  # "ray" or "local"
    address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 128
    progress: bool = True


def normalize_split(split: str) -> str:
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        raise RetroError(f"--split {split!r}: not numbers; give train,valid,test proportions such as 98,2,0") from None
    if len(parts) == 2:
        parts.append(0.0)
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0:
        raise RetroError(f"--split {split!r}: need three non-negative proportions with train > 0, e.g. 98,2,0")
    return ",".join(f"{p:g}" for p in parts)


def validate(cfg: BuildConfig) -> BuildConfig:
    """Check values that a typo could break; return the config with canonical spellings."""
    if cfg.chunk_length <= 0:
        raise RetroError(f"--chunk-length {cfg.chunk_length}: must be a positive number of GPT tokens (default 64)")
    if cfg.block_size <= 0:
        raise RetroError(f"--block-size {cfg.block_size}: must be positive (default 100000)")
    if cfg.split_mode not in SPLIT_MODES:
        raise RetroError(f"--split-mode {cfg.split_mode!r}: choose one of {', '.join(SPLIT_MODES)}")
    if cfg.pooling and cfg.pooling not in POOLINGS:
        raise RetroError(f"--pooling {cfg.pooling!r}: choose one of {', '.join(POOLINGS)}")
    if cfg.embed_dtype not in ("float16", "float32"):
        raise RetroError(f"embed_dtype {cfg.embed_dtype!r}: choose float16 or float32")
    ntrain = str(cfg.index_ntrain)
    if ntrain != "auto" and not (ntrain.isdigit() and int(ntrain) > 0):
        raise RetroError(f"--index-ntrain {ntrain!r}: give a positive number of chunks or 'auto'")
    return dataclasses.replace(cfg, split=normalize_split(cfg.split), index_ntrain=ntrain)


def from_dict(d: dict[str, Any]) -> BuildConfig:
    names = {f.name for f in fields(BuildConfig)}
    kw = {k: v for k, v in d.items() if k in names}
    if "data_path" in kw:
        kw["data_path"] = tuple(str(x) for x in kw["data_path"])
    if "index_ntrain" in kw:
        kw["index_ntrain"] = str(kw["index_ntrain"])
    return BuildConfig(**kw)


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
    return {k.replace("-", "_"): v for k, v in d.items()}
