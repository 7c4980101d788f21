"""Test-wide settings.

Property tests draw their examples from a fixed seed (``derandomize``), so a run of the suite is
repeatable: the same examples on every machine and in CI. Set ``HYPOTHESIS_PROFILE=explore`` to
draw fresh random examples instead (and keep failures in the local example database).
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one thread avoids OpenMP overhead on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
