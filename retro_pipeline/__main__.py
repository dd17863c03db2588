"""`python -m retro_pipeline`: the `retro-pipeline` command."""

from retro_pipeline.cli import main

main()
