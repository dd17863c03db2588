"""``retro-pipeline inspect``: a train-DB chunk, or a pretraining sample with its neighbors, as text.

A thin layer over :mod:`retro_pipeline.retro`. Bad input (an id out of range, an unknown split, a stage not
run yet) is one ``error:`` line and exit code 2, as everywhere in the CLI.
"""

from __future__ import annotations

import click



ALLOW_CHANGED_HELP = ("Read it even where 'retro-pipeline status' calls it stale (a corpus or tokenizer file "
                      "changed since it was built, or settings), with a warning; without it that is an error.")


def _allow_changed(f):
    return click.option("--allow-changed", is_flag=True, help=ALLOW_CHANGED_HELP)(f)


@click.group("inspect")
@click.option("--workdir", "-w", type=click.Path(file_okay=False), help="The build directory to read.")
@_allow_changed
@click.pass_context
def inspect_cmd(ctx, workdir, allow_changed):
    """Show what a build wrote, as text: a chunk of the chunk DB, or a pretraining sample and its neighbors.

    \b
    retro-pipeline inspect --workdir W db 42            chunk 42 of db/merged/train.hdf5 (neighbor id 42)
    retro-pipeline inspect --workdir W sample train 0   train sample 0: its documents, then each chunk's
                                                        text and its neighbors' texts with continuations

    The same in Python: from retro_pipeline import retro; retro.init("W"); retro.get_db_chunk_text(42);
    retro.print_neighbor_texts(0, 0, "train"). For training loops: retro_pipeline.dataset.RetroDataset.

    What 'retro-pipeline status' calls stale (a corpus file changed since the build, say) is an error unless
    --allow-changed is given (before or after the subcommand).
    """
    ctx.obj = {"workdir": workdir, "allow_changed": allow_changed}


def _retro(ctx, allow_changed: bool):
    import logging

    from retro_pipeline import retro

    if not ctx.obj["workdir"]:
        raise click.UsageError("Missing option '--workdir' (it goes before the subcommand: "
                               "inspect --workdir W db 0)")
    retro._init(ctx.obj["workdir"], allow_changed or ctx.obj["allow_changed"], option="--allow-changed",
                warn=logging.getLogger(__name__).warning)
    return retro


def _short(text: str, width: int) -> str:
    """``repr(text)`` in at most ``width`` characters where it fits, else the repr of its longest start that
    fits with '…+N' after it (N characters cut): the text is cut, never its repr, so no escape is broken."""
    r = repr(text)
    if len(r) <= width:
        return r

    def cut(k: int) -> str:
        return f"…+{len(text) - k}"

    lo, hi = 0, min(len(text), width)  # the longest k with repr(text[:k]) + cut(k) within width (or k = 0)
    while lo < hi:
        k = (lo + hi + 1) // 2
        if len(repr(text[:k])) + len(cut(k)) <= width:
            lo = k
        else:
            hi = k - 1
    return repr(text[:lo]) + cut(lo)


@inspect_cmd.command("db")
@click.argument("chunk_id", type=int)
@_allow_changed
@click.pass_context
def inspect_db(ctx, chunk_id, allow_changed):
    """Chunk CHUNK_ID of the train DB (its row in db/merged/train.hdf5, the id neighbors refer to): its corpus,
    document, token range, BERT length, GPT tokens and text, and the text of the chunk that continues it."""
    retro = _retro(ctx, allow_changed)
    ds, doc, a, b, blen = (int(x) for x in retro.get_db_chunk_rows([chunk_id])[0])
    prefix = retro.get_db_indexed_dataset_infos()[ds][1]
    text, cont = retro.get_db_chunk_and_continuation_text(chunk_id)
    click.echo(f"chunk {chunk_id} of {retro.get_db_num_chunks()} (train DB): dataset {ds} ({prefix}), doc {doc}, "
               f"tokens {a}:{b}, bert_len {blen}")
    click.echo(f"gpt tokens: {retro.get_db_chunk_gpt(chunk_id)}")
    click.echo(f"text: {text!r}")
    click.echo(f"continuation: chunk {chunk_id + 1}: {cont!r}" if cont else
               "continuation: none (the last chunk of its document)")


@inspect_cmd.command("sample")
@click.argument("split")
@click.argument("index", type=int)
@click.option("--neighbors", "-k", "k", type=click.IntRange(min=0), default=2, show_default=True,
              help="Neighbors shown per chunk, in rank order (0: every saved one).")
@click.option("--width", type=click.IntRange(min=10), default=80, show_default=True,
              help="Characters shown of each text (its repr); a longer one is cut, ending in '…+N', N characters "
                   "cut.")
@_allow_changed
@click.pass_context
def inspect_sample(ctx, split, index, k, width, allow_changed):
    """Sample INDEX of SPLIT (train, valid or test) as query-neighbors saw it: the documents it spans (never its
    neighbors' documents), then per chunk its text and each neighbor as '#chunk_id dataset/doc: text → text of
    its continuation', or '(none)' where fewer neighbors were left."""
    retro = _retro(ctx, allow_changed)
    s = retro.get_pt_sample(split, index)
    L, K, R = s["neighbor_chunks"].shape
    cl = s["neighbor_tokens"].shape[-1] // R
    shown = K if k == 0 else min(k, K)
    docs = " ".join(f"{a}/{b}" for a, b in s["doc_ids"])
    click.echo(f"{split} sample {index} of {retro.get_pt_num_samples(split)}: {len(s['text'])} tokens, {L} chunks "
               f"of {cl}, {K} neighbors saved per chunk ({int(s['neighbor_mask'][:, :, 0].sum())} found)")
    click.echo(f"documents (dataset/doc): {docs}")
    texts = retro.gpt_to_text(s["text"][:L * cl].reshape(L, cl))
    ids = s["neighbor_chunks"][:, :shown]
    nb_texts = retro.gpt_to_text(s["neighbor_tokens"][:, :shown].reshape(L, shown, R, cl))
    found = ids[:, :, 0][ids[:, :, 0] >= 0]
    rows = dict(zip(found.tolist(), retro.get_db_chunk_rows(found).tolist())) if len(found) else {}
    for j in range(L):
        click.echo(f"chunk {j}: {_short(texts[j], width)}")
        for m in range(shown):
            c = int(ids[j, m, 0])
            if c < 0:
                click.echo(f"  {m + 1}. (none)")
                continue
            conts = [_short(t, width) for t, c2 in zip(nb_texts[j][m][1:], ids[j, m, 1:]) if c2 >= 0]
            end = " (end of document)" if (ids[j, m, 1:] < 0).any() else ""
            click.echo(f"  {m + 1}. #{c} {rows[c][0]}/{rows[c][1]}: " + " → ".join([_short(nb_texts[j][m][0], width),
                                                                                      *conts]) + end)
