"""The ``retro-pipeline`` command line. Every command is a thin layer over the Python API.

``retro-pipeline --help`` imports neither torch, ray nor faiss; commands import what they use.
"""

from __future__ import annotations

import inspect
import signal
import sys
from typing import Any

import click

from retro_pipeline.cli_options import click_option
from retro_pipeline.config import RUN_OPTIONS, load_config_file, run_options
from retro_pipeline.errors import RetroError, StageFailed, UserError
from retro_pipeline.stage import Stage, all_stages

ALIASES = {"embed": "embed-sampled"}  # old names, hidden

# Commands that are not stages: name -> (module, attribute). The group imports a module when one of its
# commands is asked for (its modules never import this one back).
LAZY_COMMANDS = {
    "train": ("retro_pipeline.cli_train", "train_command"),
    "evaluate": ("retro_pipeline.cli_train", "evaluate_command"),
    "mine-negatives": ("retro_pipeline.cli_train", "mine_negatives_command"),
    "demo-pairs": ("retro_pipeline.cli_train", "demo_pairs_command"),
    "train-tokenizer": ("retro_pipeline.cli_tools", "train_tokenizer"),
    "preprocess": ("retro_pipeline.cli_tools", "preprocess"),
    "inspect": ("retro_pipeline.cli_inspect", "inspect_cmd"),
    "verify": ("retro_pipeline.cli_verify", "verify"),
    "report": ("retro_pipeline.cli_report", "report"),
    "serve": ("retro_pipeline.cli_serve", "serve"),
}


def common_options() -> list[click.Option]:
    """Options of every stage command: the workdir, a config file, --force and how to run."""
    return [
        click.Option(["--workdir", "-w"], required=True, type=click.Path(file_okay=False),
                     help="Build directory: holds config.json, the chunk DB, embeddings and progress markers."),
        click.Option(["--config", "config_file"], type=click.Path(dir_okay=False),
                     help="JSON or YAML file of options (keys with _ for -; any stage's); the command line wins."),
        click.Option(["--force"], is_flag=True, help="Rebuild the stages whose settings or inputs changed (and "
                                                     "the stages after them) instead of refusing."),
        click.Option(["--redo"], is_flag=True, help="Recompute this command's stages from scratch although "
                                                    "nothing changed (the built stages after them are rebuilt "
                                                    "too). Missing files alone need no --redo: a plain run "
                                                    "makes them again."),
        *[click_option(o) for o in RUN_OPTIONS],
        click.Option(["--no-progress"], is_flag=True, help="No progress bars."),
    ]


def split_options(kw: dict[str, Any]) -> tuple[str, dict, Any, bool, bool]:
    """Command-line + config-file options → (workdir, stage options given, run options, force, redo)."""
    kw = dict(kw)
    workdir = kw.pop("workdir")
    force = kw.pop("force")
    redo = kw.pop("redo", False)
    progress = not kw.pop("no_progress")
    cfile = kw.pop("config_file")
    opts = load_config_file(cfile) if cfile else {}
    opts.update({k: v for k, v in kw.items() if v is not None})
    run_keys = {o.name for o in RUN_OPTIONS}
    run = run_options({k: v for k, v in opts.items() if k in run_keys}, progress=progress)
    return workdir, {k: v for k, v in opts.items() if k not in run_keys}, run, force, redo


def stage_command(name: str, classes: list[type[Stage]], help_: str, demo_ok: bool = False) -> click.Command:
    """A subcommand that runs ``classes`` in order, with their own options only."""

    def callback(**kw):
        _run([c.name for c in classes], kw, demo_ok=demo_ok)
        if demo_ok:
            _show_examples(kw["workdir"])

    params = common_options()
    own = {o.name: o for c in classes for o in c.options}  # an option shared by several stages, once
    params[3:3] = [click_option(o) for o in own.values()]
    return click.Command(name, callback=callback, params=params, help=help_,
                         short_help=help_.splitlines()[0])


class RetroCLI(click.Group):
    """The command group; expected errors of any command end as one ``error:`` line, never a traceback.

    Usage errors (a bad option value), user errors (:class:`UserError`) and stage failures print one line
    and exit 2 (1 for a stage failure, whose traceback goes to the log). SIGTERM and Ctrl-C stop the run
    with one line saying that the same command resumes it.
    """

    def list_commands(self, ctx):
        stages = all_stages()
        groups = [c.group for c in stages if c.group]
        return ["build", *dict.fromkeys(n for c in stages for n in ([c.group, c.name] if c.group else [c.name])),
                *sorted((set(self.commands) | set(LAZY_COMMANDS)) - {"build"} - set(groups))]

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        if name in LAZY_COMMANDS:
            import importlib

            module, attr = LAZY_COMMANDS[name]
            found = getattr(importlib.import_module(module), attr)
            return found if isinstance(found, click.Command) else found()   # a factory (train: built per registry)
        if name == "build":
            classes = all_stages()
            return stage_command("build", classes, f"Run every stage in order ({', '.join(c.name for c in classes)})."
                                 "\n\nWith no --data-path, builds a demo corpus from the Python standard library's "
                                 "documentation first and runs on it.", demo_ok=True)
        group = [c for c in all_stages() if c.group == name]
        if group:
            return stage_command(name, group, f"Run {' and '.join(c.name for c in group)}.\n\n"
                                 + "\n\n".join(f"{c.name}: {inspect.cleandoc(c.__doc__ or '')}" for c in group))
        for cls in all_stages():
            if cls.name == ALIASES.get(name, name):
                doc = inspect.cleandoc(cls.__doc__ or cls.name)
                cmd = stage_command(name, [cls], doc)
                cmd.hidden = name in ALIASES
                return cmd
        return None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from retro_pipeline.logs import setup_logging

        setup_logging()
        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except (click.exceptions.Abort, _Terminated, KeyboardInterrupt, SystemError) as e:
            # a signal's exception raised while Ray's compiled code runs (ray.wait) arrives as a SystemError
            # around it
            sig = e.__cause__ if isinstance(e, SystemError) else e
            if isinstance(sig, _Terminated):
                return _stop(f"terminated (SIGTERM); {_resume_hint(e)}", 143, standalone_mode)
            if isinstance(sig, (click.exceptions.Abort, KeyboardInterrupt)):
                return _stop(f"interrupted; {_resume_hint(e)}", 130, standalone_mode)
            raise
        except click.ClickException as e:
            cmd = " ".join(a for a in (prog_name or "retro-pipeline", *(sys.argv[1:2] if args is None else args[:1])))
            return _stop(f"{e.format_message()} (see '{cmd} --help')", e.exit_code, standalone_mode)
        except UserError as e:
            return _stop(str(e), 2, standalone_mode)
        except StageFailed as e:
            from retro_pipeline.logs import current_log_file

            where = current_log_file()
            return _stop(f"{e}" + (f" (traceback in {where})" if where else ""), 1, standalone_mode)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread is. A BaseException, as KeyboardInterrupt is: library code that
    catches Exception to keep going (Ray Train's controller loop does) must not swallow a stop."""


def _sigterm(signum, frame):
    raise _Terminated()


def _resume_hint(e: BaseException) -> str:
    """How to go on after Ctrl-C / SIGTERM: the command's own words (a ``resume_hint`` it set on the exception,
    as ``train`` does; click's Abort carries the KeyboardInterrupt as its cause), else a build's."""
    for x in (e, e.__cause__, e.__context__):
        if getattr(x, "resume_hint", None):
            return x.resume_hint
    return "run the same command again (a build resumes where it stopped)"


def _stop(message: str, code: int, standalone: bool):
    import logging

    # the workdir's log (where the command opened one) keeps the error line and the traceback behind it
    logging.getLogger("retro_pipeline").debug("error: %s (exit %d)", message, code, exc_info=sys.exc_info()[0] is not None)
    click.echo(f"error: {message}", err=True)
    if standalone:
        sys.exit(code)
    return code


@click.group(cls=RetroCLI, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="retro-pipeline")
def cli():
    """RETRO retrieval preprocessing on Ray: corpora → chunk database → embeddings → faiss index → neighbors.

    Start with `retro-pipeline build --workdir W`: with no --data-path it builds a demo corpus from the
    Python standard library's documentation and runs every stage on it. Each stage also runs alone;
    `retro-pipeline status --workdir W` shows how far a build got. A run killed at any point resumes where
    it stopped when started again.
    """


# The demo corpus holds ~140 train samples of 2,048 tokens and its valid split 3: at Megatron's batch of 256,
# --eval-iters auto would give no evaluation. One evaluation batch of 2 asks 2 valid samples of it.
DEMO_TRAINING = {"global_batch_size": 2, "eval_iters": 1}


def _run(stages, kw, demo_ok=False):
    from retro_pipeline.pipeline import run_stages
    from retro_pipeline.workdir import Workdir

    workdir, given, run, force, redo = split_options(kw)
    stored = Workdir(workdir).stored()
    if demo_ok and "data_path" not in given and not stored.get("data_path"):
        from retro_pipeline.demo import build_demo_corpus

        try:
            prefix = build_demo_corpus(str(Workdir(workdir).root / "demo_corpus"))
        except OSError as e:
            raise RetroError(f"{Workdir(workdir).root}: cannot write the demo corpus there ({e.strerror}); "
                             f"pass a --workdir in a directory you can write to") from None
        click.echo(f"no --data-path given: using the demo corpus {prefix} (Python standard library docs, "
                   f"GPT-2 BPE)", err=True)
        given["data_path"] = ["1", str(prefix)]
        given.setdefault("gpt_tokenizer", "gpt2")
    if demo_ok and str(Workdir(workdir).root / "demo_corpus") in str(given.get("data_path") or stored.get("data_path")):
        for k, v in DEMO_TRAINING.items():  # Megatron's sample counts sized for a corpus this small
            if k not in stored:
                given.setdefault(k, v)
    out = run_stages(workdir, stages, given, run, force=force, redo=redo, report=demo_ok)  # build: W/report.html
    for name, done in out.items():
        if done.get("already_done"):
            click.echo(f"{name}: already done (took {done.get('seconds', 0):.1f} s) " + _counts(done))
        elif done.get("blocks_run", 0) < done.get("blocks", 0) or done.get("seconds", 0) > \
                done.get("seconds_this_run", done.get("seconds", 0)) + 0.05:
            click.echo(f"{name}: done in {done.get('seconds', 0):.1f} s, resumed ({done.get('blocks_run', 0)} of "
                       f"{done.get('blocks', 0)} blocks and {done.get('seconds_this_run', 0):.1f} s in this run) "
                       + _counts(done))
        else:
            click.echo(f"{name}: done in {done.get('seconds', 0):.1f} s " + _counts(done))
    if {"db-build", "embed-sampled", "index-add"} <= set(out) and out["index-add"].get("blocks_run"):
        n = out["embed-sampled"].get("n_chunks", 0) + out["index-add"].get("n_chunks_embedded", 0)
        click.echo(f"chunks embedded: {n} (train DB: {out['db-build'].get('n_chunks_train')} chunks, each embedded once)")
    return out


def _counts(d: dict) -> str:
    keys = [k for k in d if k.startswith("n_") or k in ("dim", "index_str", "nprobe", "efSearch") or
            k.startswith("recall@")]
    return "(" + ", ".join(f"{k} {d[k]}" for k in keys) + ")" if keys else ""


@cli.command()
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False), help="The build directory to report on.")
def status(workdir):
    """Per stage: done, partial (blocks done of total), not started, or stale (made from changed inputs)."""
    for name, state, detail in status_rows(workdir):
        click.echo(f"{name:15s} {state:10s} {detail}".rstrip())


def status_rows(workdir) -> list[tuple[str, str, str]]:
    """(stage, state, what it says) per stage, in pipeline order: the lines of ``retro-pipeline status`` (and of
    the status page of ``retro-pipeline serve``)."""
    from retro_pipeline.pipeline import status as get_status

    out = []
    for name, st in get_status(workdir).items():
        if st.get("stale"):
            out.append((name, "stale", f"made from what changed since: {st['stale']} (rebuild it with --force)"))
        elif st["state"] == "done":
            out.append((name, "done", f"{st.get('blocks', 0)} blocks, {st.get('seconds', 0):.1f} s {_counts(st)}"))
        elif st["state"] == "partial":
            more = ""
            if st.get("missing"):
                more = f"; {len(st['missing'])} recorded file(s) gone, e.g. {st['missing'][0]} (a rerun makes them)"
            elif st["blocks_done"] >= st["blocks_total"]:
                more = "; its final step (finalize) did not finish"
            out.append((name, "partial", f"{st['blocks_done']} of {st['blocks_total']} blocks{more}"))
        else:
            out.append((name, "not started", ""))
    return out


def _show_examples(workdir: str, n: int = 3) -> None:
    """Print a few chunks of a finished DB, and neighbors of a pretraining sample, so the user sees real output."""
    import numpy as np

    from retro_pipeline.read import WorkdirReader
    from retro_pipeline.workdir import Workdir

    wd = Workdir(workdir)
    reader = WorkdirReader(wd)
    total = reader.db_num_chunks("train")
    rows = reader.db_chunks("train", step=max(1, total // n))[:n]
    texts = reader.chunk_texts(rows)
    click.echo(f"\n{total} train chunks in {wd.merged_db_path('train')}; a few of them:")
    for r, t in zip(rows, texts):
        click.echo(f"  [dataset {r[0]} doc {r[1]} tokens {r[2]}:{r[3]}] {t[:150]!r}")
    if not (wd.stored().get("retro_neighbor_dirs") or {}).get("train"):
        return
    ss = reader.samples("train")
    nb = reader.neighbors("train")
    tokens = ss.tokens(0, 1)[0, :ss.seq_length].reshape(ss.L, ss.chunk_length)
    docs = [f"{a}/{b}" for a, b in ss.doc_ids(0)]
    shown = ", ".join(docs[:6]) + (f" and {len(docs) - 6} more" if len(docs) > 6 else "")
    click.echo(f"\nneighbors of pretraining sample 0 (its documents, dataset/doc: {shown}; never neighbors of it):")
    for j in sorted({0, ss.L // 2}):
        text = reader.chunk_reader.gpt.detokenize_flat(tokens[j], np.array([0, ss.chunk_length]))[0]
        click.echo(f"  chunk {j}: {text[:120]!r}")
        hits = [int(x) for x in nb[j][:2] if x >= 0]
        rows = np.concatenate([reader.db_rows("train", [h]) for h in hits]) if hits else np.zeros((0, 5), np.uint32)
        for row, t in zip(rows, reader.chunk_texts(rows)):  # in rank order
            click.echo(f"    neighbor [dataset {row[0]} doc {row[1]}]: {t[:120]!r}")


def main():
    cli(prog_name="retro-pipeline")


if __name__ == "__main__":  # python -m retro_pipeline.cli
    main()
