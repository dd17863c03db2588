"""The db-build test helpers now live in helpers.py; this name stays for test modules that import it."""

from helpers import edge_case_docs, random_size_corpus, read_h5, reference_block  # noqa: F401
