"""Shared fixtures; the tiny problems themselves live in ``problems.py``."""

import logging

import pytest
import torch

# pytest attaches its log capture to every non-propagating logger, torch's structured-trace
# log included, which then formats a record for every traced tensor: tracing (make_fx,
# torch.func.linearize, the traced curvature products) ran about 4x slower under pytest.
logging.getLogger("torch.__trace").addFilter(lambda record: False)


@pytest.fixture
def float64_default():
    """Run a test with float64 as the default dtype, restoring the previous one."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
