"""A small real-text demo corpus that every machine can build offline: Python's own documentation.

The documents are every topic of ``pydoc_data.topics`` (the help() pages of the language reference) and the
docstrings (at least 200 characters, deduplicated) of a fixed list of pure-Python standard-library modules, their
public functions and classes and the public methods of those classes. They are tokenized with the real GPT-2
BPE (shipped offline, see :func:`retro_pipeline.tokenizers.load_gpt_tokenizer`) into
``<out_dir>/stdlib_docs.bin/.idx``. The same Python version gives the same bytes on every run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEMO_NAME = "stdlib_docs"
MIN_DOC_CHARS = 200
DEMO_MODULES = (
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bisect", "calendar", "collections", "concurrent.futures._base",
    "concurrent.futures.process", "configparser", "contextlib", "copy", "csv", "dataclasses", "difflib",
    "email.message", "email.utils", "enum", "fractions", "ftplib", "functools", "gettext", "glob", "gzip",
    "heapq", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress",
    "json", "json.decoder", "json.encoder", "logging", "logging.handlers", "mailbox", "multiprocessing.pool",
    "optparse", "pathlib", "pickle", "pprint", "queue", "random", "shlex", "shutil", "smtplib", "socketserver",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
    "traceback", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request", "uuid",
    "warnings", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)


def _members(mod) -> list[tuple[str, object]]:
    """(qualified name, object) for a module, its public classes/functions and those classes' methods."""
    out: list[tuple[str, object]] = [(mod.__name__, mod)]
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        out.append((f"{mod.__name__}.{name}", obj))
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_"):
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member) or isinstance(member, property):
                    out.append((f"{mod.__name__}.{name}.{attr}", member))
    return out


@functools.lru_cache(maxsize=None)
def _fresh(function: str, args: str) -> str:
    """JSON of ``function(**json.loads(args))`` of this module, computed in a fresh interpreter: what a
    module exposes can be changed by what the caller imported (``torch.package`` replaces
    ``inspect.getfile``, for one), and the demo data must depend on the Python installation only."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys; from retro_pipeline import demo; "
            f"sys.stdout.write(json.dumps(demo.{function}(**json.loads(sys.argv[1]))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = root
    env["PYTHONHASHSEED"] = "0"
    done = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"collecting the demo text failed:\n{done.stderr.strip()}")
    return done.stdout


def demo_text_documents(include_source: bool = False) -> list[str]:
    """The demo documents, in a fixed order: pydoc topics by name, then docstrings by module and name, then
    (with ``include_source``) the source file of each module in :data:`DEMO_MODULES`, one document each.
    Collected in a fresh interpreter, so the result does not depend on what the caller imported."""
    return json.loads(_fresh("_collect_text_documents", json.dumps({"include_source": include_source})))


def _collect_text_documents(include_source: bool = False) -> list[str]:
    from pydoc_data.topics import topics

    docs = [f"{name}\n\n{topics[name].strip()}" for name in sorted(topics)]
    seen = {topics[name].strip() for name in topics}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in DEMO_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:  # a stripped-down Python may lack some modules
                continue
            for qualname, obj in _members(mod):
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < MIN_DOC_CHARS or doc in seen:
                    continue
                seen.add(doc)
                docs.append(f"{qualname}\n\n{doc}")
    if include_source:
        for modname in DEMO_MODULES:
            spec = importlib.util.find_spec(modname)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                docs.append(f"# {modname}\n\n{Path(spec.origin).read_text(encoding='utf-8')}")
    return docs


def demo_query_pairs(min_doc_chars: int = 40, max_doc_chars: int = 1000) -> list[dict]:
    """Query → document pairs every machine can build: for each public function, method and class of
    :data:`DEMO_MODULES`, ``query`` = its name and signature (``Class.method(self, x, *, key=None)``, without
    the module; object addresses such as ``<object object at 0x7f..>`` dropped), ``pos`` = its docstring (at
    least ``min_doc_chars``, cut at ``max_doc_chars``), ``module`` = the module (to hold out a split by
    module). Documents are unique: a docstring shared by several names (an alias, an inherited copy) is kept
    for the first one only. The same list, in the same order, for a given Python installation (collected in a
    fresh interpreter)."""
    return json.loads(_fresh("_collect_query_pairs",
                             json.dumps({"min_doc_chars": min_doc_chars, "max_doc_chars": max_doc_chars})))


def split_by_module(pairs: list[dict], test_share: float = 0.25, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs: a seeded ``test_share`` of the modules (at least one) is held out whole, so no
    held-out document, nor any other document of its module, is trained on."""
    modules = sorted({p["module"] for p in pairs})
    rng = np.random.default_rng(seed)
    test = set(rng.choice(modules, size=max(1, round(test_share * len(modules))), replace=False).tolist())
    return [p for p in pairs if p["module"] not in test], [p for p in pairs if p["module"] in test]


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _collect_query_pairs(min_doc_chars: int, max_doc_chars: int) -> list[dict]:
    out, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in DEMO_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ImportError:
                continue
            for qualname, obj in _members(mod)[1:]:
                doc = inspect.getdoc(obj)
                if not doc or len(doc) < min_doc_chars or doc in seen:
                    continue
                seen.add(doc)
                name = qualname[len(modname) + 1:]
                try:
                    sig = _ADDRESS.sub("", str(inspect.signature(obj.fget if isinstance(obj, property) else obj)))
                except (TypeError, ValueError):
                    sig = ""
                out.append({"query": name + sig, "pos": doc[:max_doc_chars], "module": modname})
    return out


def demo_pretrain_passages(train_pairs: list[dict], held_out_modules, words: int = 80,
                           min_words: int = 10) -> list[str]:
    """Unlabelled text for pre-training (RetroMAE, RetroAR, MLM) on every machine, none of it from the held-out
    modules: the pydoc topics, the training documents (``train_pairs``' ``pos``) and the source files of the
    standard library (sorted by path; tests, idlelib and site-packages left out), cut into passages of
    ``words`` whitespace-separated words (shorter tails under ``min_words`` dropped). A held-out module's
    file is left out, and a held-out package's whole directory."""
    from pydoc_data.topics import topics

    held_files, held_dirs = set(), set()
    for modname in held_out_modules:
        spec = importlib.util.find_spec(modname)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin).resolve()
        held_files.add(origin)
        if origin.name == "__init__.py":
            held_dirs.add(origin.parent)
    lib = Path(os.__file__).resolve().parent
    files = []
    for f in sorted(lib.rglob("*.py")):
        rel = f.relative_to(lib).parts
        if rel[0] in ("site-packages", "dist-packages", "idlelib") or any(p in ("test", "tests") for p in rel[:-1]):
            continue
        rf = f.resolve()
        if rf in held_files or any(d in rf.parents for d in held_dirs):
            continue
        files.append(f)
    texts = [topics[name] for name in sorted(topics)] + [p["pos"] for p in train_pairs]
    texts += [f.read_text(encoding="utf-8", errors="replace") for f in files]
    passages = []
    for text in texts:
        w = text.split()
        passages += [" ".join(w[i:i + words]) for i in range(0, len(w), words) if len(w[i:i + words]) >= min_words]
    return passages


def _valid(prefix: str, n_docs: int) -> bool:
    from retro_pipeline.corpus import IndexedDataset
    from retro_pipeline.errors import RetroError

    try:
        return len(IndexedDataset(prefix)) == n_docs
    except RetroError:
        return False


def build_demo_corpus(out_dir, max_docs: int | None = None, include_source: bool = False,
                      progress: bool = False) -> str:
    """Build (or reuse) ``<out_dir>/stdlib_docs.bin/.idx`` tokenized with GPT-2; return the prefix.

    The documentation alone is about 750 documents / 260k tokens; ``include_source`` adds the modules' source
    files (``stdlib_docs_src``, about 820 documents / 1.7M tokens) for a bigger demo.
    """
    from retro_pipeline.corpus import IndexedDataset, IndexedDatasetWriter, best_dtype
    from retro_pipeline.preprocess import tokenize_documents
    from retro_pipeline.tokenizers import load_gpt_tokenizer

    out = Path(out_dir)
    prefix = os.fspath(out / (DEMO_NAME + ("_src" if include_source else "")))
    texts = demo_text_documents(include_source)
    if max_docs is not None:
        texts = texts[:max_docs]
    if _valid(prefix, len(texts)):
        log.info("demo corpus %s already built (%d documents)", prefix, len(texts))
        if progress:
            print(f"demo corpus {prefix} already built ({len(texts)} documents)")
        return prefix
    tok = load_gpt_tokenizer("gpt2")
    dtype = np.dtype(best_dtype(tok.vocab_size))
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for i in range(0, len(texts), 500):
            writer.add_flat(*tokenize_documents(tok, texts[i:i + 500], dtype))
    n_tokens = IndexedDataset(prefix).num_tokens
    log.info("demo corpus %s: %d documents, %d GPT-2 tokens", prefix, len(writer), n_tokens)
    if progress:
        print(f"demo corpus {prefix}: {len(writer)} documents, {n_tokens} GPT-2 tokens")
    return prefix
