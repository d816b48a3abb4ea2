"""The conformance suite as a pytest test, parametrised by the sglang_fx_conformance plugin."""

import pytest

from sglang_fx.conformance.runner import CaseResult


def test_conformance(fx_result: CaseResult) -> None:
    if fx_result.status == "known gap":
        pytest.xfail(fx_result.detail)
    if fx_result.status == "skipped":
        pytest.skip(fx_result.detail)
    assert fx_result.passed, f"{fx_result.status}: {fx_result.detail}"
