"""Every backend of every op against the reference, forward and every gradient.

Backends and cases are discovered (fastmlm.ops.dispatch.TABLES and
tests/ops/cases), so a backend or case added later is tested without
editing this file. A backend that cannot serve a case is skipped with its
own reason.
"""
import os

import pytest
import torch

import fastmlm.ops  # noqa: F401  (registers every op family's table)
from fastmlm.ops.dispatch import TABLES
from tests.ops.cases import all_cases
from tests.ops.harness import check_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params():
    for case in all_cases():
        for backend in TABLES[case.family].backends:
            if backend == "torch":
                continue  # the reference itself; validated in test_references.py
            for device in DEVICES:
                for dtype in case.dtypes:
                    yield pytest.param(case, backend, device, dtype,
                                       id=f"{case.id}-{backend}-{device}-{str(dtype).replace('torch.', '')}")


def _skip_reason(case, backend, device, dtype):
    if backend == "triton" and device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "triton on CPU tensors needs TRITON_INTERPRET=1"
    if case.skip is not None:
        return case.skip(backend, device, dtype)
    return None


@pytest.mark.parametrize("case,backend,device,dtype", list(_params()))
def test_backend_matches_reference(case, backend, device, dtype):
    reason = _skip_reason(case, backend, device, dtype)
    if reason:
        pytest.skip(reason)
    try:
        check_case(case, backend, device, dtype)
    except fastmlm.ops.BackendUnavailable as exc:
        # Raised before the backend ran: its own reason for not serving.
        pytest.skip(f"{backend} does not serve this case: {str(exc).splitlines()[0]}")
