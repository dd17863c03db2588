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

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from embedder.errors import UserError


@dataclass
class TaskOptions:
    """Options a task may read; the trainer fills them from the command line. Unknown task-specific ones go
    in ``extra``."""

    model: str | None = None                  # encoder to start from: a directory or hub id (None: packaged MiniLM)
    model_config: str | None = None           # mlm/retromae/retroar: a config.json (or directory): a random-init encoder
    tokenizer: str | None = None              # with model_config: tokenizer directory / tokenizer.json (train-tokenizer)
    document_model: str | None = None         # custom: the separate document encoder
    pooling: str | None = None                # the saved encoder's pooling (None: the model's own, else mean)
    max_length: int = 128                     # tokens per text
    mask_ratio: float = 0.3                   # retromae / retroar encoder masking
    decoder_mask_ratio: float = 0.5           # retromae enhanced decoding: share of positions hidden per row
    mlm_probability: float = 0.15             # mlm
    temperature: float = 0.02                 # contrastive
    learnable_temperature: bool = False
    loss: str = "infonce"                     # contrastive: infonce | margin | logistic
    margin: float = 0.2
    matryoshka_dims: tuple[int, ...] = ()     # contrastive: also train truncated embeddings of these sizes
    num_negatives: int | None = None          # contrastive: hard negatives per query used (None: all given)
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class of a training objective. Subclasses set ``name`` and ``row_kind`` and implement the rest."""

    name: str = ""
    row_kind: str = "text"   # "text" (pre-training rows: text) or "pairs" (query + positive [+ neg])
    from_config = False      # whether options.model_config + options.tokenizer can build a random-init encoder

    def __init__(self, options: TaskOptions):
        self.options = options
        if options.model_config is not None or options.tokenizer:
            if not self.from_config:
                from embedder.tasks import TASK_MODULES, get_task

                able = [n for n in TASK_MODULES if get_task(n).from_config]
                raise UserError(f"task {self.name} starts from a trained encoder (--model); --model-config and "
                                f"--tokenizer build a random-init encoder for tasks {', '.join(able)} only")
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
