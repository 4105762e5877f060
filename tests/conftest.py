"""Fixtures shared by several test files (helpers that are plain functions live in tests/tiny_models.py,
tests/tool_scripts.py and tests/fakes/)."""

import pytest
import torch

from tests.tiny_models import tiny_sd_pipeline_folder


@pytest.fixture(scope="module")
def tiny_sd_base(tmp_path_factory) -> str:
    """A tiny random-init SD1-shaped diffusers pipeline folder, written once per test module."""
    return tiny_sd_pipeline_folder(str(tmp_path_factory.mktemp("base")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module of tiny models: per-op thread start-up dominates them, and hurts
    badly on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
