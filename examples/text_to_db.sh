#!/usr/bin/env bash
# Raw text to chunk database and embeddings on one machine (a local Ray is started for you).
# Usage: examples/text_to_db.sh docs.jsonl WORKDIR
set -euo pipefail
input=${1:?JSONL file with a "text" field per line}
workdir=${2:?output work directory}
mkdir -p "$workdir/corpus"
retro-pipeline preprocess --input "$input" --output-prefix "$workdir/corpus/docs" --tokenizer gpt2 --workers 2
retro-pipeline build --workdir "$workdir" --data-path "$workdir/corpus/docs" --gpt-tokenizer gpt2
retro-pipeline status --workdir "$workdir"
