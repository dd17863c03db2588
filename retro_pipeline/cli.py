"""The ``retro-pipeline`` command line. Every command is a thin layer over the Python API.

``retro-pipeline --help`` imports neither torch, ray nor faiss; commands import what they use.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import fields
from typing import Any

import click

from retro_pipeline.config import POOLINGS, SPLIT_MODES, BuildConfig, RunOptions, load_config_file
from retro_pipeline.errors import RetroError, StageFailed, UserError

BUILD_KEYS = {f.name for f in fields(BuildConfig)}
RUN_KEYS = {f.name for f in fields(RunOptions)}


def stage_options(f):
    """Options shared by every build stage; all default to None so that 'not given' is visible."""
    opts = [
        click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False),
                     help="Build directory: holds config.json, the chunk DB, embeddings and progress markers."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="JSON or YAML file of the options below (keys with _ for -); the command line wins."),
        click.option("--data-path", help="GPT token corpora: 'PREFIX' or a blend 'W1 PREFIX1 W2 PREFIX2 ...' "
                                         "of Megatron .bin/.idx files. Required at the first run."),
        click.option("--gpt-tokenizer", help="Tokenizer of those corpora: a tokenizer.json, a directory, "
                                             "'gpt2' (packaged GPT-2 BPE) or a hub id. Required at the first run."),
        click.option("--embedder", help="Encoder for chunk embeddings: a directory or hub id "
                                        "[default: the packaged all-MiniLM-L6-v2]."),
        click.option("--pooling", type=click.Choice(POOLINGS), help="Embedding pooling [default: the model's own, else mean]."),
        click.option("--chunk-length", type=click.IntRange(min=1), help="GPT tokens per chunk [default: 64]."),
        click.option("--split", help="train,valid,test proportions of documents [default: 98,2,0]."),
        click.option("--split-mode", type=click.Choice(SPLIT_MODES),
                     help="random: seeded random split and index sample; megatron: document-order split and "
                          "first-N sample, as Megatron [default: random]."),
        click.option("--seed", type=click.IntRange(min=0), help="Seed of every random choice [default: 1234]."),
        click.option("--index-ntrain", help="Chunks sampled to train the index, or 'auto' [default: auto]."),
        click.option("--block-size", type=click.IntRange(min=1), help="Rows per block file at most: the unit of work and of resume; "
                                                    "small inputs are cut into about 64 blocks [default: 100000]."),
        click.option("--force", is_flag=True, help="Rebuild the stages whose settings changed instead of refusing."),
        click.option("--address", help="Ray cluster address (auto, host:port, ray://host:port); "
                                       "none starts a local Ray."),
        click.option("--executor", type=click.Choice(["ray", "local"]),
                     help="ray: a pool of Ray actors [default]; local: one process, no Ray (debugging)."),
        click.option("--num-workers", type=click.IntRange(min=1), help="Workers in the pool [default: from the cluster's CPUs/GPUs]."),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), help="CPUs per worker [default: 1]."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), help="GPUs per embedding worker [default: 1 where the "
                                                           "cluster has GPUs, else 0]."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Embedding device [default: cuda when present]."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]),
                     help="Embedding precision on CUDA [default: float16 on cuda, float32 on cpu]."),
        click.option("--batch-size", type=click.IntRange(min=1), help="Texts per encoder batch [default: 128]."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def split_options(kw: dict[str, Any]) -> tuple[str, dict, RunOptions, bool]:
    """Command-line + config-file options → (workdir, build options given, run options, force)."""
    kw = dict(kw)
    workdir = kw.pop("workdir")
    force = kw.pop("force")
    progress = not kw.pop("no_progress")
    cfile = kw.pop("config_file")
    opts = load_config_file(cfile) if cfile else {}
    unknown = set(opts) - BUILD_KEYS - RUN_KEYS
    if unknown:
        raise RetroError(f"{cfile}: unknown option(s) {', '.join(sorted(unknown))}; see retro-pipeline build --help")
    opts.update({k: v for k, v in kw.items() if v is not None})
    run = RunOptions(progress=progress, **{k: v for k, v in opts.items() if k in RUN_KEYS})
    return workdir, {k: v for k, v in opts.items() if k in BUILD_KEYS}, run, force


class RetroCLI(click.Group):
    """The command group; expected errors of any command end as one ``error:`` line, never a traceback.

    Usage errors (a bad option value), user errors (:class:`UserError`) and stage failures print one line
    and exit 2 (1 for a stage failure, whose traceback goes to the log). SIGTERM and Ctrl-C stop the run
    with one line saying that the same command resumes it.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from retro_pipeline.logs import setup_logging

        setup_logging()
        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            return _stop("interrupted; run the same command again to resume", 130, standalone_mode)
        except _Terminated:
            return _stop("terminated (SIGTERM); run the same command again to resume", 143, standalone_mode)
        except KeyboardInterrupt:
            return _stop("interrupted; run the same command again to resume", 130, standalone_mode)
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


class _Terminated(Exception):
    pass


def _sigterm(signum, frame):
    raise _Terminated()


def _stop(message: str, code: int, standalone: bool):
    click.echo(f"error: {message}", err=True)
    if standalone:
        sys.exit(code)
    return code


@click.group(cls=RetroCLI, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="retro-pipeline")
def cli():
    """RETRO retrieval preprocessing on Ray: corpora → chunk database → embeddings (→ index → neighbors).

    Start with `retro-pipeline build --workdir W`: with no --data-path it builds a demo corpus from the
    Python standard library's documentation and runs every stage on it. Each stage also runs alone;
    `retro-pipeline status --workdir W` shows how far a build got. A run killed at any point resumes where
    it stopped when started again.
    """


def _run(stages, kw, demo_ok=False):
    from retro_pipeline.pipeline import run_stages
    from retro_pipeline.workdir import Workdir

    workdir, given, run, force = split_options(kw)
    if demo_ok and "data_path" not in given and not Workdir(workdir).stored().get("data_path"):
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
    out = run_stages(workdir, stages, given, run, force=force)
    for name, done in out.items():
        click.echo(f"{name}: done in {done.get('seconds', 0):.1f} s " + _counts(done))
    return out


def _counts(d: dict) -> str:
    keys = [k for k in d if k.startswith("n_") or k == "dim"]
    return "(" + ", ".join(f"{k} {d[k]}" for k in keys) + ")" if keys else ""


@cli.command()
@stage_options
def build(**kw):
    """Run every stage in order (db-build, then embedding of the index-training sample)."""
    _run(["db-build", "embed-sampled"], kw, demo_ok=True)
    _show_examples(kw["workdir"])


@cli.command("db-build")
@stage_options
def db_build(**kw):
    """Chunk the corpora into db/individual blocks and db/merged/{train,sampled,valid}.hdf5."""
    _run(["db-build"], kw)


@cli.command("embed-sampled")
@stage_options
def embed_sampled(**kw):
    """Embed the index-training sample (db/merged/sampled.hdf5) into embed/sampled/ blocks."""
    _run(["embed-sampled"], kw)


cli.add_command(click.Command("embed", params=embed_sampled.params, callback=embed_sampled.callback, hidden=True,
                              help="Old name of embed-sampled."))


@cli.command()
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False))
def status(workdir):
    """Per stage: done, partial (blocks done of total) or not started."""
    from retro_pipeline.pipeline import status as get_status

    for name, st in get_status(workdir).items():
        if st.get("stale"):
            click.echo(f"{name:15s} stale      built from inputs that changed since: {st['stale']}")
        elif st["state"] == "done":
            click.echo(f"{name:15s} done       {st.get('blocks', 0)} blocks, {st.get('seconds', 0):.1f} s {_counts(st)}")
        elif st["state"] == "partial":
            click.echo(f"{name:15s} partial    {st['blocks_done']} of {st['blocks_total']} blocks")
        else:
            click.echo(f"{name:15s} not started")


def _show_examples(workdir: str, n: int = 3) -> None:
    """Print a few chunks of a finished DB so the user sees real output."""
    import h5py

    from retro_pipeline.pipeline import load_config
    from retro_pipeline.stages.embed import ChunkReader
    from retro_pipeline.workdir import Workdir

    wd = Workdir(workdir)
    with h5py.File(wd.merged_db_path("train"), "r") as f:
        total = len(f["chunks"])
        rows = f["chunks"][:: max(1, total // n)][:n]
    texts = ChunkReader(load_config(workdir)).texts(rows)
    click.echo(f"\n{total} train chunks in {wd.merged_db_path('train')}; a few of them:")
    for r, t in zip(rows, texts):
        click.echo(f"  [dataset {r[0]} doc {r[1]} tokens {r[2]}:{r[3]}] {t[:150]!r}")


def main():
    cli(prog_name="retro-pipeline")


from retro_pipeline import cli_tools  # noqa: E402,F401  (registers train-tokenizer and preprocess)

if __name__ == "__main__":
    main()
