"""Runs every Triton kernel on CPU through the interpreter when no CUDA device is present (TRITON_INTERPRET must be
set before anything imports triton, hence here), and skips `gpu` tests without CUDA."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
