"""Float scalar arguments of kernels that run in float64 are annotated tl.float64: unannotated, Triton passes a Python
float as float32 on a GPU (0.7 -> 0.699999988...). The interpreter passes the Python float itself, so no value test on
CPU sees the rounding; the signatures are checked instead."""

from __future__ import annotations

import inspect

import pytest

pytest.importorskip("triton")
import triton.language as tl

from kexue_fast.kernels import jose, power_iteration, som

FLOAT64_SCALARS = [
    (power_iteration._power_iteration_finalize_kernel, ("eps",)),
    (jose._jose_separate_step_kernel, ("alpha", "margin")),
    (jose._jose_joint_step_kernel, ("alpha", "margin")),
    (som._som_gram_kernel, ("gamma_arg",)),
    (som._som_grad_kernel, ("gamma_arg",)),
    (som._som_finish_kernel, ("lambda1", "lambda2", "eps2")),
]


def test_float_scalars_of_float64_kernels_are_annotated_float64():
    for kernel, names in FLOAT64_SCALARS:
        annotations = inspect.get_annotations(kernel.fn, eval_str=True)
        for name in names:
            assert annotations.get(name) == tl.float64, f"{kernel.fn.__name__}: {name} must be annotated tl.float64"
