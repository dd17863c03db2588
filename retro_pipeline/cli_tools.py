"""Commands that are not build stages: ``train-tokenizer`` and ``preprocess`` (raw text to a corpus)."""

from __future__ import annotations

import click


_INPUT_HELP = ("JSONL (one JSON object per line), Parquet or text file, or a directory of them (repeatable). "
               "A directory is read recursively: .jsonl/.json/.ndjson[.gz], .parquet/.pq and text files "
               "(.txt, .text, .md, .rst, no suffix); other files are skipped with a warning. A file named "
               "here is read whatever its suffix (unknown ones as one text document).")


@click.command("train-tokenizer")
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(exists=True), help=_INPUT_HELP)
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Directory to write tokenizer.json into (created if missing).")
@click.option("--vocab-size", required=True, type=int,
              help="Vocabulary size to aim for, at least 300; a small input can give fewer entries "
                   "(a warning says so).")
@click.option("--kind", type=click.Choice(["bpe", "wordpiece", "sentencepiece"]), default="bpe", show_default=True,
              help="bpe: byte-level BPE (GPT); wordpiece: BERT-style, for an embedder; sentencepiece.")
@click.option("--text-key", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
@click.option("--min-frequency", default=2, show_default=True, type=click.IntRange(min=1),
              help="Fewest occurrences of a pair (or word piece) to become a vocabulary entry.")
def train_tokenizer(inputs, output, vocab_size, kind, text_key, min_frequency):
    """Train a tokenizer on raw text with the Rust tokenizers library."""
    import tokenizers

    from retro_pipeline.tokenizers import train_tokenizer as train

    path = train(list(inputs), output, vocab_size, kind=kind, text_key=text_key, min_frequency=min_frequency)
    size = tokenizers.Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    asked = "" if size >= vocab_size else f" (asked for {vocab_size:,})"
    click.echo(f"wrote {path}: {kind} vocabulary of {size:,} tokens{asked}")


@click.command()
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(exists=True), help=_INPUT_HELP)
@click.option("--output-prefix", required=True,
              help="Writes PREFIX.bin and PREFIX.idx (Megatron's indexed dataset); directories are created.")
@click.option("--tokenizer", required=True,
              help="A tokenizer.json, a directory, 'gpt2' (the packaged GPT-2 BPE) or a hub id.")
@click.option("--text-key", default="text", show_default=True, help="JSONL/Parquet field holding the text.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Ray workers tokenizing in parallel (an input of fewer than two shards is tokenized in this "
                   "process); the output does not depend on it.")
@click.option("--address", help="Ray cluster address; none starts a local Ray when --workers > 1.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def preprocess(inputs, output_prefix, tokenizer, text_key, workers, address, no_progress):
    """Tokenize raw text into a Megatron indexed dataset (one document per record, EOD appended)."""
    from retro_pipeline.preprocess import preprocess as run

    stats = run(list(inputs), output_prefix, tokenizer, text_key=text_key, workers=workers,
                progress=not no_progress, address=address)
    skipped = stats.get("skipped_empty", 0)
    note = f"; {skipped:,} empty record{'s' if skipped != 1 else ''} skipped" if skipped else ""
    click.echo(f"wrote {stats['prefix']}.bin/.idx: {stats['docs']:,} documents, {stats['tokens']:,} tokens{note}")
