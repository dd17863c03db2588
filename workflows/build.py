"""A whole build as a Ray job: the same command as ``retro-pipeline build``, run on the cluster it is sent to.

Submit it from a checkout of this repository (its root is uploaded as the job's working directory)::

    RAY_AUTH_MODE=token ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m workflows.build --workdir /shared/W --data-path /shared/data/corpus --gpt-tokenizer gpt2

Every option of ``retro-pipeline build`` works here, and it prints the same summary. ``--workdir`` and every
input path must be on storage that all nodes of the cluster read and write. ``--address`` defaults to the
cluster the job runs on (``RAY_ADDRESS``, which Ray sets for a job's driver; elsewhere ``auto``: the cluster
`ray start` last recorded on this node); an ``--address`` given, on the command line or in ``--config``, wins.
Exit codes are the CLI's: 0 done, 1 a stage failed, 2 a usage error, 130/143 interrupted (the same command
resumes it); `ray job submit` reports any non-zero one as a failed job.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    # a default below the command line and --config: RetroCLI reads RAY_ADDRESS only when no address is given
    os.environ.setdefault("RAY_ADDRESS", "auto")
    from retro_pipeline.cli import cli

    cli(["build", *(sys.argv[1:] if argv is None else argv)], prog_name="retro-pipeline")


if __name__ == "__main__":
    main()
