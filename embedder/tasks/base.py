"""What every training task is to the one training loop (:mod:`embedder.trainer`).

A task owns its model parts (the encoder being trained plus any heads or decoders), how its JSONL rows are
checked and batched, and its loss; the trainer owns everything else (optimizer, schedule, accumulation,
autocast, clipping, checkpoints and resume, data-parallel workers, progress). Tasks are registered by name in
:data:`embedder.tasks.TASKS`.

Determinism contract (what makes ``--resume`` exact and two workers equal one): a task draws randomness
(masking, decoder attention masks) only from the ``numpy.random.Generator`` the trainer passes to
:meth:`Task.collate`, which the trainer seeds from (seed, step, micro-batch); never from global RNG state.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from embedder.errors import UserError
from embedder.options import Option
from embedder.settings import POOLINGS


# ---------------------------------------------------------------------- options

# Options more than one task takes; each task lists the options it takes in ``Task.OPTIONS``.
MODEL = Option("model", str, None, "Encoder to start from: a model directory (e.g. an earlier train --output-dir) "
               "or a hub id.", path=True, shown_default="the packaged all-MiniLM-L6-v2")
MAX_LENGTH = Option("max_length", int, 128, "Tokens per text (at most the encoder's own maximum).", minimum=2)
POOLING = Option("pooling", str, None, "Pooling of the saved encoder (retromae, retroar and custom train the [CLS] "
                 "embedding and take only cls).", choices=POOLINGS, shown_default="the model's own, else mean; cls")
MODEL_CONFIG = Option("model_config", object, None,
                      "Start from a random-init encoder built from this config.json (or a directory holding one; e.g. "
                      "{\"model_type\": \"bert\", \"hidden_size\": 256, ...}) instead of --model.", path=True)
TOKENIZER = Option("tokenizer", str, None, "With --model-config: the tokenizer (a directory or tokenizer.json, e.g. "
                   "from train-tokenizer --kind wordpiece).", path=True)
MASK_RATIO = Option("mask_ratio", float, 0.3, "Share of each text's tokens masked in the encoder's input (above 0, "
                    "below 1).")
DECODER_MASK_RATIO = Option("decoder_mask_ratio", float, 0.5, "Share of positions each decoder row hides "
                            "(enhanced decoding; 0 or more, below 1).")


class TaskOptions:
    """The values of a run's task options, by name (``options.mask_ratio``), plus ``extra`` (a dict for a
    task's own settings outside the command line). Built from keyword arguments; :class:`Task` resolves them
    against what it declares (``Task.OPTIONS``): every declared option not given reads as its default, and a
    value given for an option the task does not take is an error. Outside a task, a name not given reads as
    None."""

    def __init__(self, **values: Any):
        extra = values.pop("extra", None)
        self.__dict__.update(values)
        self.extra = dict(extra or {})

    def __getattr__(self, name: str) -> Any:   # only for names not set
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def given(self) -> dict[str, Any]:
        """The values set (not None), ``extra`` left out."""
        return {k: v for k, v in self.__dict__.items() if k != "extra" and v is not None}

    def replace(self, **values: Any) -> "TaskOptions":
        return TaskOptions(**{**self.__dict__, **values})

    def to_json(self) -> dict[str, Any]:
        def plain(v):
            return list(v) if isinstance(v, tuple) else v

        return {**{k: plain(v) for k, v in self.__dict__.items() if k != "extra"}, "extra": dict(self.extra)}

    def __eq__(self, other) -> bool:
        return isinstance(other, TaskOptions) and self.__dict__ == other.__dict__

    def __repr__(self) -> str:
        return f"TaskOptions({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


class Task:
    """Base class of a training objective. Subclasses set ``name``, ``summary``, ``row_kind`` and ``OPTIONS``
    and implement the rest.

    ``OPTIONS`` are the task's options (:class:`embedder.options.Option`; a module defining a task must import
    no torch, so that ``train --help`` reads every task's options quickly): the ``train`` command's flags,
    their help and defaults, the values a checkpoint records and a resume must match (those that
    ``changes_output``) all come from them."""

    name: str = ""
    summary: str = ""        # one line for `train --help`: what the task trains, on which rows
    row_kind: str = "text"   # "text" (pre-training rows: text) or "pairs" (query + positive [+ neg])
    OPTIONS: tuple[Option, ...] = (MODEL, MAX_LENGTH, POOLING)

    def __init__(self, options: TaskOptions | None = None):
        self.options = self.resolve_options(options or TaskOptions())
        options = self.options
        if options.model_config is not None or options.tokenizer:
            if options.model_config is not None and options.model is not None:
                raise UserError(f"task {self.name}: both --model ({options.model}) and --model-config "
                                f"({options.model_config}) given; pass --model to continue from a trained encoder, "
                                f"or --model-config with --tokenizer to start from a random init")
            if options.model_config is None:
                raise UserError(f"--tokenizer {options.tokenizer} goes with --model-config (a new encoder built "
                                f"from a config); without one, task {self.name} uses the tokenizer of --model")
            if not options.tokenizer:
                raise UserError(f"task {self.name} builds a new encoder from model_config and needs its tokenizer: "
                                f"pass tokenizer (--tokenizer), a directory or tokenizer.json from retro-pipeline "
                                f"train-tokenizer --kind wordpiece")

    @classmethod
    def resolve_options(cls, options: TaskOptions) -> TaskOptions:
        """``options`` as this task reads them: each declared option checked (``Option.check``) or its default;
        a value for an option the task does not declare is a :class:`UserError` naming the tasks that take it."""
        declared = {o.name: o for o in cls.OPTIONS}
        given = options.given()
        stray = [k for k in given if k not in declared]
        if stray:
            from embedder.tasks import options_by_task

            takes = options_by_task()
            if "model_config" in stray or "tokenizer" in stray:
                raise UserError(f"task {cls.name} starts from a trained encoder (--model); --model-config and "
                                f"--tokenizer build a random-init encoder for tasks "
                                f"{', '.join(takes['model_config'])} only")
            name = stray[0]
            flag = "--" + name.replace("_", "-")
            others = takes.get(name)
            where = f"an option of task {', '.join(others)}" if others else "not an option of any task"
            raise UserError(f"{flag}: {where}, not of task {cls.name}; leave it out, or pick the task that takes it")
        values = {o.name: o.check(given[o.name]) if o.name in given else o.default for o in cls.OPTIONS}
        return TaskOptions(**values, extra=options.extra)

    @classmethod
    def recorded_options(cls, options: TaskOptions) -> dict[str, Any]:
        """The values of this task's options that change the trained model (what a checkpoint records and a
        resume must match), JSON-ready; paths and models are matched by :mod:`embedder.checkpoints` itself."""
        resolved = cls.resolve_options(options).to_json()
        return {o.name: resolved[o.name] for o in cls.OPTIONS
                if o.changes_output and o.name not in ("model", "model_config", "tokenizer", "document_model")}

    # ---- model
    def build(self, device) -> "Any":
        """Create (or load) every trained part; return the ``torch.nn.Module`` holding all of them (its
        ``state_dict`` is what checkpoints store and what data-parallel training wraps)."""
        raise NotImplementedError

    # ---- data
    def check_row(self, row: dict, where: str) -> dict:
        """Validate one parsed JSONL row (``where`` = "file:line" for errors) and return what the task
        keeps of it. Raise :class:`embedder.errors.UserError` naming ``where`` for a bad row."""
        raise NotImplementedError

    def batch_groups(self, rows: list[dict]) -> list[Any] | None:
        """A key per row that one batch must not hold twice (e.g. the positive document), or None."""
        return None

    def collate(self, rows: list[dict], rng: np.random.Generator) -> dict[str, Any]:
        """Tokenize and mask a micro-batch into tensors (on CPU), drawing randomness only from ``rng``."""
        raise NotImplementedError

    # ---- the tokenizer a collate uses (tasks that tokenize texts with their encoder's tokenizer)
    _tokenizer_limit: tuple[Any, int] | None = None   # (tokenizer, the encoder's max_length) once known

    def encoder_tokenizer(self) -> tuple[Any, int]:
        """(tokenizer, the encoder's max_length) without building the model: by default those of
        ``options.model`` (:func:`embedder.settings.tokenizer_and_max_length`)."""
        from embedder.settings import tokenizer_and_max_length

        return tokenizer_and_max_length(self.options.model)

    def use_tokenizer(self, tokenizer, limit: int) -> None:
        """Collate with ``tokenizer``, its encoder's max_length being ``limit`` (:meth:`build` passes those of
        the encoder it loaded)."""
        self._tokenizer_limit = (tokenizer, int(limit))

    def tokenizer_and_limit(self) -> tuple[Any, int]:
        """(tokenizer, tokens per text) for :meth:`collate`: ``options.max_length`` capped at the encoder's
        max_length. Those :meth:`build` gave, else (a process that has not built the model, e.g. a
        data-loading worker) :meth:`encoder_tokenizer`'s, loaded once."""
        if self._tokenizer_limit is None:
            self._tokenizer_limit = self.encoder_tokenizer()
        tokenizer, limit = self._tokenizer_limit
        return tokenizer, min(self.options.max_length, limit)

    # ---- objective
    def loss(self, module, batch: dict[str, Any], gather=None) -> tuple[Any, dict[str, float]]:
        """(scalar loss, metrics) of a micro-batch on ``module`` (what :meth:`build` returned, possibly
        wrapped in DistributedDataParallel: use ``getattr(module, "module", module)`` for attributes).
        ``gather`` (None on one worker) all-gathers a tensor across workers with gradients flowing to the
        local part, for losses that use other workers' negatives."""
        raise NotImplementedError

    # ---- gradient caching (optional): for losses over the whole batch, e.g. in-batch negatives
    #: True: with ``grad_accum`` > 1 the trainer collates the whole batch once, embeds it in ``grad_accum``
    #: pieces without gradients, takes the loss over all of it, then re-runs each piece with the loss's
    #: gradient (:mod:`embedder.gradcache`), so accumulation gives the one-big-batch result. Such a task
    #: implements the three methods below, and ``loss`` is ``loss_from_outputs(module(**model_inputs(batch)))``.
    caches_gradients: bool = False

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The part of a collated batch that ``module(**inputs)`` takes."""
        raise NotImplementedError

    def split_inputs(self, inputs: dict[str, Any], parts: int) -> list[dict[str, Any]]:
        """``inputs`` cut into ``parts`` pieces by rows, each a valid ``module(**piece)`` input, such that the
        outputs of the pieces, concatenated along dim 0 (0-dim outputs: the same in every piece), are the
        outputs of the whole."""
        raise NotImplementedError

    def loss_from_outputs(self, outputs: tuple, batch: dict[str, Any], gather=None) -> tuple[Any, dict[str, float]]:
        """(scalar loss, metrics) from what ``module(**model_inputs(batch))`` returned."""
        raise NotImplementedError

    # ---- result
    def save(self, module, output_dir: str) -> None:
        """Save the trained encoder (only the encoder) so that ``embedder.Encoder.load(output_dir)`` and
        sentence-transformers load it."""
        raise NotImplementedError

    def trainable(self, module) -> Iterable:
        return [p for p in module.parameters() if p.requires_grad]
