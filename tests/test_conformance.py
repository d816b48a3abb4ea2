"""The shipped conformance suite, run over every available backend (see conformance/)."""

from sglang_fx.conformance.test_conformance import test_conformance  # noqa: F401
