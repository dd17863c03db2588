"""``retro-pipeline report``: one self-contained HTML page of a workdir's build (:mod:`retro_pipeline.report`)."""

from __future__ import annotations

import click


@click.command("report")
@click.option("--workdir", "-w", required=True, type=click.Path(file_okay=False), help="The build directory to report on.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Where to write the page.  [default: WORKDIR/report.html]")
@click.option("--similarity-sample", type=click.IntRange(min=0), default=16, show_default=True,
              help="Pretraining chunks embedded, with their first 5 saved neighbors, for the neighbor-similarity "
                   "distribution (0: none, and no encoder is loaded).")
def report(workdir, output, similarity_sample):
    """Write an HTML report of a build and print its path: per-stage wall time and throughput, a timeline of
    the workers' blocks, chunk lengths, corpus and split sizes, the recall / queries-per-second curve of the
    index with its tuned point, neighbor similarities and missing neighbors, and a few samples with their
    neighbors' text.

    The page is one file with its plots inside (it opens offline). It shows what the workdir holds: on a
    partial build the later sections say they have not run yet. Every number is also in the page as JSON
    (<script id="report-data">). `build` ends by writing it.
    """
    from retro_pipeline.report import write_report

    click.echo(str(write_report(workdir, output, similarity_sample=similarity_sample)))
