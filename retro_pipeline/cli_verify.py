"""``retro-pipeline verify``: recompute a sample of the finished blocks and compare them byte for byte."""

from __future__ import annotations

from dataclasses import replace

import click

from retro_pipeline.cli_options import click_option
from retro_pipeline.stages.embed import EMBED_OPTIONS


@click.command()
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False), help="The build to verify.")
@click.option("--fraction", type=float, default=0.05, show_default=True,
              help="Share of each finished stage's blocks to recompute (above 0, at most 1); at least one block "
                   "per stage.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the block choice.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def verify(workdir, fraction, seed, no_progress, **embed):
    """Recompute a seeded random share of every finished stage's blocks and report files that differ (exit 1).

    The blocks are recomputed in this process, on this machine (its CPUs unless --device cuda), into a scratch
    directory in the workdir that is removed at the end, and compared byte for byte with the workdir's files.
    Outputs are deterministic, so a difference means a damaged or altered file (or one made from a damaged
    input: later stages read earlier ones' files), except in blocks made from embeddings: float math gives
    the same bits only on the same kind of machine and device, with the same --dtype and --batch-size: verify
    uses those the block markers record (a CUDA build is recomputed on the CPU where there is no GPU, and then
    differs) unless given here. Only blocks are recomputed, not what a
    stage's last step combines from them (merged DBs, trained and added indexes).

    Exit 0: every file identical; 1: some differ; 2: bad input.
    """
    from retro_pipeline.verify import verify as run

    checks = run(workdir, fraction, seed, {k: v for k, v in embed.items() if v is not None},
                 on_stage=lambda c: click.echo(c.line()), progress=not no_progress)
    return 1 if any(c.differs for c in checks) else 0


verify.params += [click_option(replace(o, shown_default="cpu") if o.name == "device" else o) for o in EMBED_OPTIONS]
