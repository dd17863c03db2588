"""Encoder training commands: ``train`` (one loop for every task of :mod:`embedder.tasks`), ``evaluate`` and
``mine-negatives`` (thin layers over :mod:`embedder.evaluate`).

Registered lazily by :mod:`retro_pipeline.cli` (LAZY_COMMANDS).
Nothing here imports torch or ray until a command runs.
"""

from __future__ import annotations

import contextlib
import os

import click


from embedder.trainer import PRECISIONS   # imports no torch


@click.command("train", context_settings={"max_content_width": 110},
               short_help="Train (or pre-train) the encoder the pipeline embeds with.")
@click.option("--train-file", required=True, type=click.Path(dir_okay=False),
              help="JSONL training rows (optionally .gz), one JSON object per line; a bad row stops the run "
                   "with one line naming file:line.")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False),
              help="Where the trained encoder is saved (a model directory: `retro-pipeline build --embedder "
                   "DIR` takes it), next to checkpoints/, loss_log.jsonl and training_args.json.")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Optimizer steps to train (one step = one global batch). Give this or --epochs; "
                   "neither: one epoch.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
              help="Passes over the training rows (fractions allowed), instead of --max-steps.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Global batch: rows per optimizer step over all workers and accumulation steps together; "
                   "must be a multiple of --num-workers x --grad-accum.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1),
              help="Pieces each worker's share of a batch is run in (batch-size / (num-workers x grad-accum) rows "
                   "in memory at a time). contrastive: the loss is still taken over the whole batch (gradient "
                   "caching: each piece runs twice), so the result is one big batch's; retromae, retroar, custom, "
                   "mlm: the mean of the pieces' losses, each piece masked on its own.")
@click.option("--lr", default=5e-5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Peak learning rate of AdamW.")
@click.option("--weight-decay", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="AdamW weight decay (on weight matrices; not on biases and norms).")
@click.option("--warmup-steps", type=click.IntRange(min=0),
              help="Steps of linear LR warmup from 0, then linear decay to 0 at the last step [default: 0].")
@click.option("--warmup-ratio", type=click.FloatRange(min=0, max=1, max_open=True),
              help="Warmup as a share of the total steps, instead of --warmup-steps.")
@click.option("--max-grad-norm", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Clip the gradient norm to this (0: no clipping).")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(PRECISIONS),
              help="auto: bf16 autocast on GPUs that have it (else fp16), fp32 on CPU; fp16 (with loss "
                   "scaling) and bf16 need CUDA.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the batch order, masking and dropout: the same settings give the same run.")
@click.option("--save-every", type=click.IntRange(min=1),
              help="Write a checkpoint every N steps to OUTPUT_DIR/checkpoints/step-N (and at the last step); "
                   "default: none until the end.")
@click.option("--keep-checkpoints", type=click.IntRange(min=1),
              help="Keep only the newest N checkpoints [default: all].")
@click.option("--resume", help="Continue a run: 'latest' (the newest checkpoint under --output-dir) or a "
                               "checkpoints/step-N directory. Same settings continue exactly.")
@click.option("--stop-after", type=click.IntRange(min=1),
              help="Stop this run at step N with a checkpoint (the LR schedule still spans --max-steps); "
                   "--resume latest continues it.")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=1),
              help="Steps between loss log flushes and TensorBoard points (every step is logged).")
@click.option("--tensorboard", type=click.Path(file_okay=False),
              help="Also write TensorBoard scalars (loss, lr, grad norm) into this directory (needs the "
                   "tensorboard package).")
@click.option("--num-workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Data-parallel Ray Train workers (gloo on CPU, NCCL on GPU); each takes its share of every "
                   "global batch, so the result matches one worker. 1 without --address: no Ray.")
@click.option("--address", help="Ray cluster address; none starts a local Ray when --num-workers > 1.")
@click.option("--gpu/--cpu", "use_gpu", default=None,
              help="Train on GPUs (one per worker) or on CPUs [default: GPUs when there are any].")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def _train_base(task, train_file, output_dir, max_steps, epochs, batch_size, grad_accum, lr, weight_decay, warmup_steps,
           warmup_ratio, max_grad_norm, precision, seed, save_every, keep_checkpoints, resume, stop_after, log_every,
           tensorboard, num_workers, address, use_gpu, no_progress, **task_opts):
    """Train (or pre-train) the encoder the pipeline embeds with; the result is a model directory.

    \b
    Examples:
      retro-pipeline train --task contrastive --train-file pairs.jsonl --output-dir enc --max-steps 1000
      retro-pipeline train --task retromae --model bert-base-uncased --train-file text.jsonl \\
          --output-dir pre --epochs 1 --num-workers 4
      retro-pipeline build --workdir W --embedder enc ...
    """
    from embedder.tasks.base import TaskOptions
    from embedder.trainer import TrainConfig, refuse_existing_run, train

    options = TaskOptions(**{k: v for k, v in task_opts.items() if v is not None and v is not False})
    cfg = TrainConfig(task=task, train_file=train_file, output_dir=output_dir, options=options, lr=lr,
                      weight_decay=weight_decay, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
                      max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
                      max_grad_norm=max_grad_norm or None, precision=precision, seed=seed, save_every=save_every,
                      keep_checkpoints=keep_checkpoints, log_every=log_every, tensorboard=tensorboard,
                      resume=resume, stop_after=stop_after, num_workers=num_workers, use_gpu=use_gpu,
                      address=address, progress=not no_progress)
    if not resume:
        refuse_existing_run(cfg)  # never over an earlier run's checkpoints or final model
    if address or (num_workers > 1 and os.environ.get("RAY_ADDRESS")):
        from embedder.ray_session import ensure_ray

        ensure_ray(address)  # fails in seconds on a dead address, follows 'auto', sends this machine's token
    try:
        s = train(cfg)
    except BaseException as e:  # Ctrl-C / SIGTERM: RetroCLI.main prints this hint after "interrupted; "
        with contextlib.suppress(Exception):
            e.resume_hint = _resume_hint(output_dir)
        raise
    loss = s.get("final_loss")
    loss_text = f", last loss {loss:.4g}" if isinstance(loss, float) else ""
    if s.get("finished"):
        click.echo(f"trained {task} for {s['step']} steps ({s['num_workers']} worker(s), {s['device']}, "
                   f"{s['precision']}){loss_text}: encoder saved in {s['output_dir']} "
                   f"(use it with: retro-pipeline build --embedder {s['output_dir']})")
    else:
        click.echo(f"stopped {task} at step {s['step']} of {s['max_steps']}{loss_text}; checkpoint in "
                   f"{s['checkpoints'][-1] if s.get('checkpoints') else s['output_dir']} (continue with the "
                   f"same command and --resume latest, with a later --stop-after or none)")
    return s


def train_command() -> click.Command:
    """The `train` command of the tasks registered now: the trainer's own options, then every option some task
    declares (``Task.OPTIONS``; one flag for an option several tasks take, its help naming them), and
    ``--task`` listing each task's summary. Built when asked for, so a task registered by a plugin or a test
    gets its flags and help."""
    from embedder.tasks import TASK_MODULES, get_task
    from retro_pipeline.cli_options import click_option

    tasks = {name: get_task(name) for name in TASK_MODULES}
    declared: dict[str, tuple] = {}   # name -> (option, tasks taking it)
    for name, cls in tasks.items():
        for o in cls.OPTIONS:
            if o.name in declared and declared[o.name][0] != o:
                raise RuntimeError(f"option {o.name} is declared differently by tasks {declared[o.name][1]} and {name}")
            declared.setdefault(o.name, (o, []))[1].append(name)
    task_opt = click.Option(["--task"], required=True, type=click.Choice(list(tasks)),
                            help="; ".join(f"{n}: {c.summary}" for n, c in tasks.items()) + ".")
    own = []
    for o, takers in declared.values():
        opt = click_option(o)
        if len(takers) < len(tasks):
            opt.help = f"{', '.join(takers)}: {opt.help[:1].lower()}{opt.help[1:]}"
        own.append(opt)
    base = _train_base
    trainer_opts = [p for p in base.params if p.name != "no_progress"]
    last = [p for p in base.params if p.name == "no_progress"]
    return click.Command("train", callback=base.callback, params=[task_opt, *trainer_opts, *own, *last],
                         help=base.help, short_help=base.short_help, context_settings=base.context_settings)


def _resume_hint(output_dir: str) -> str:
    """How to go on after a train run was interrupted: from its newest checkpoint with --resume latest, or,
    with none written yet, from the start."""
    from embedder.trainer import list_checkpoints

    found = list_checkpoints(output_dir)
    if found:
        return (f"run the same command with --resume latest to continue from the newest checkpoint, "
                f"{found[-1][1]} (step {found[-1][0]})")
    return ("no checkpoint was written yet (--save-every N writes one every N steps); run the same command again "
            "to start over")


# ---------------------------------------------------------------------- evaluate, mine-negatives


@click.command("evaluate")
@click.option("--model", help="Encoder to judge: a model directory (e.g. a train --output-dir) or a hub id "
                              "[default: the packaged all-MiniLM-L6-v2].")
@click.option("--eval-file", required=True, type=click.Path(dir_okay=False),
              help="JSONL pair rows {'query': ..., 'pos': ... [, 'neg': [...]]}; the corpus searched is every "
                   "distinct positive and negative of the file; rows with one query text are one query.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Cut-off of MRR@k, Recall@k and nDCG@k (Recall@1 and @100 are always given).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Texts per encoder batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
def evaluate_command(model, eval_file, k, batch_size, as_json):
    """Retrieval quality of an encoder on query/positive pairs: MRR@10, Recall@1/10/100, nDCG@10 (exact
    cosine search over the file's documents)."""
    import json

    from embedder.evaluate import evaluate

    encoder, rows = _encoder_and_pairs(model, eval_file)
    metrics = evaluate(encoder, rows, k=k, batch_size=batch_size)
    if as_json:
        click.echo(json.dumps(metrics))
        return
    for name, value in metrics.items():
        click.echo(f"{name:>12}  {value:.4f}" if isinstance(value, float) else f"{name:>12}  {value}")


@click.command("mine-negatives")
@click.option("--model", help="Encoder that ranks the candidates: a model directory or hub id [default: the "
                              "packaged all-MiniLM-L6-v2].")
@click.option("--input", "input_file", required=True, type=click.Path(dir_okay=False),
              help="JSONL pair rows {'query': ..., 'pos': ...}; the candidates are every distinct positive and "
                   "negative of the file.")
@click.option("--output", required=True, type=click.Path(dir_okay=False),
              help="JSONL written atomically: each row with 'neg' replaced by its query's top-k candidates "
                   "(best first) that are none of the query's positives; train --task contrastive reads it.")
@click.option("--k", default=50, show_default=True, type=click.IntRange(min=1), help="Negatives mined per query.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Texts per encoder batch.")
def mine_negatives_command(model, input_file, output, k, batch_size):
    """Hard negatives for contrastive training: each query's top-ranked documents that are not its positives."""
    import json

    from embedder.atomic import atomic_path
    from embedder.data import pair_row_json
    from embedder.evaluate import mine_negatives

    encoder, rows = _encoder_and_pairs(model, input_file)
    mined = mine_negatives(encoder, rows, k=k, batch_size=batch_size)
    with atomic_path(output) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in mined:
                f.write(json.dumps(pair_row_json(row), ensure_ascii=False) + "\n")
    click.echo(f"wrote {output}: {len(mined):,} rows, {sum(len(r['neg']) for r in mined):,} hard negatives "
               f"(up to {k} per row)")


@click.command("demo-pairs")
@click.option("--output-dir", required=True, type=click.Path(file_okay=False),
              help="Where train.jsonl, test.jsonl, docs.jsonl and pretrain.jsonl are written (created if missing).")
@click.option("--test-share", default=0.25, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                      max_open=True),
              help="Share of the modules held out whole as the test split.")
@click.option("--seed", default=0, show_default=True, help="Seeds which modules are held out.")
def demo_pairs_command(output_dir, test_share, seed):
    """Training data every machine has, to try `train` and `evaluate` on: query -> document pairs from the
    Python standard library (a function's name and signature -> its docstring), split by module.

    \b
    Writes (all four written first, then moved into place) into OUTPUT_DIR:
      train.jsonl  {"query", "pos"} pairs of the training modules (train --task contrastive)
      test.jsonl   the same for the held-out modules (evaluate --eval-file)
      docs.jsonl   {"text"}: the training documents (train --task retromae / retroar / mlm)
      pretrain.jsonl {"text"}: 80-word passages of more text for pre-training: the pydoc topics, the
                   training documents and the standard library's source files, none from a held-out module
    """
    import contextlib
    import json
    from pathlib import Path

    from embedder.atomic import atomic_path
    from retro_pipeline.demo import demo_pretrain_passages, demo_query_pairs, split_by_module
    from retro_pipeline.errors import UserError

    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create it ({e.strerror}); choose another --output-dir") from None
    train_rows, test_rows = split_by_module(demo_query_pairs(), test_share, seed)
    files = {"train.jsonl": [{"query": p["query"], "pos": p["pos"]} for p in train_rows],
             "test.jsonl": [{"query": p["query"], "pos": p["pos"]} for p in test_rows],
             "docs.jsonl": [{"text": p["pos"]} for p in train_rows],
             "pretrain.jsonl": [{"text": t} for t in
                                demo_pretrain_passages(train_rows, {p["module"] for p in test_rows})]}
    with contextlib.ExitStack() as stack:  # every file written first, then all moved into place together
        for name, rows in files.items():
            tmp = stack.enter_context(atomic_path(out / name))
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    n_mod = len({p["module"] for p in train_rows}), len({p["module"] for p in test_rows})
    click.echo(f"wrote {out}/train.jsonl ({len(train_rows):,} pairs, {n_mod[0]} modules), test.jsonl "
               f"({len(test_rows):,} pairs, {n_mod[1]} held-out modules), docs.jsonl ({len(train_rows):,} texts), "
               f"pretrain.jsonl ({len(files['pretrain.jsonl']):,} passages)")


class _PairRows:
    """``check_row`` for :func:`embedder.data.read_rows`: pair rows, errors naming file:line."""

    @staticmethod
    def check_row(row, where):
        from embedder.data import pair_row

        return pair_row(row, where)


def _encoder_and_pairs(model, path):
    from embedder.data import read_rows
    from embedder.encoder import Encoder

    rows = read_rows(path, _PairRows())  # the file first: a bad line fails before the model loads
    return Encoder.load(model, option="--model"), rows
