"""The sglang-fx conformance suite: one set of cases run against any backend.

Run it with `sglang-fx conformance --backend NAME`, or from pytest (the `sglang_fx_conformance`
plugin is registered automatically): `pytest --pyargs sglang_fx.conformance --fx-backend NAME`.
Ground truth is Hugging Face `transformers` on tiny random checkpoints built locally, and the
torch reference backend.
"""

from .cases import Case, Outcome, cases_for
from .context import Context
from .runner import CaseResult, Report, judge, run

__all__ = ["Case", "CaseResult", "Context", "Outcome", "Report", "cases_for", "judge", "run"]
