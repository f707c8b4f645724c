"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit runs (CPU CI).

``BISSL_REQUIRE_ALL=1`` (set by ``make test``, so in CI) turns every skip into a failure except
those that need hardware or a toolkit CI does not have (a CUDA device, nvcc): a test of an
optional part skips only where its extra is missing, and CI installs every extra, so a skip there
means something that should be tested was not.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

REQUIRE_ALL = os.environ.get("BISSL_REQUIRE_ALL", "0") == "1"
#: Skip reasons CI accepts under BISSL_REQUIRE_ALL=1 (no GPU, no CUDA toolkit on CI machines).
ALLOWED_SKIPS = ("needs a CUDA device", "no CUDA device", "nvcc not found")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state; 2 threads like CI."""
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (
                f"BISSL_REQUIRE_ALL=1: this test skipped ({reason}); CI installs every "
                f"extra, so nothing may skip there except for a missing GPU or nvcc"
            )
