"""Commands that are not build stages: ``train-tokenizer`` and ``preprocess`` (raw text to a corpus)."""

from __future__ import annotations

import click

from retro_pipeline.cli import cli, errors_as_messages


@cli.command("train-tokenizer")
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(exists=True),
              help="Text files, JSONL, Parquet or directories of text files (repeatable).")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory for tokenizer.json.")
@click.option("--vocab-size", required=True, type=int)
@click.option("--kind", type=click.Choice(["bpe", "wordpiece", "sentencepiece"]), default="bpe", show_default=True,
              help="bpe: byte-level BPE (GPT); wordpiece: BERT-style, for an embedder; sentencepiece.")
@click.option("--text-key", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
@errors_as_messages
def train_tokenizer(inputs, output, vocab_size, kind, text_key):
    """Train a tokenizer on raw text with the Rust tokenizers library."""
    from retro_pipeline.tokenizers import train_tokenizer as train

    path = train(list(inputs), output, vocab_size, kind=kind, text_key=text_key)
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(exists=True),
              help="JSONL (one document per line), Parquet, a text file or a directory of text files (repeatable).")
@click.option("--output-prefix", required=True, help="Writes PREFIX.bin and PREFIX.idx.")
@click.option("--tokenizer", required=True, help="A tokenizer.json, a directory, 'gpt2' or a hub id.")
@click.option("--text-key", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
@click.option("--workers", default=1, show_default=True, type=int, help="Ray workers tokenizing in parallel.")
@click.option("--address", help="Ray cluster address; none starts a local Ray when --workers > 1.")
@click.option("--no-progress", is_flag=True)
@errors_as_messages
def preprocess(inputs, output_prefix, tokenizer, text_key, workers, address, no_progress):
    """Tokenize raw text into a Megatron indexed dataset (one document per record, EOD appended)."""
    from retro_pipeline.preprocess import preprocess as run

    stats = run(list(inputs), output_prefix, tokenizer, text_key=text_key, workers=workers,
                progress=not no_progress, address=address)
    click.echo(f"wrote {output_prefix}.bin/.idx: {stats.get('docs')} documents, {stats.get('tokens')} tokens")
