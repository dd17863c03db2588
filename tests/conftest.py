"""Shared fixtures: one Ray session for the whole test run, small tokenizers and corpora."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs and a small object store, started once and shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
                 logging_level="warning", log_to_driver=True)
    yield ray
    ray.shutdown()
