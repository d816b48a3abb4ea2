"""pytest integration of the conformance suite (registered as the `sglang_fx_conformance`
pytest11 plugin, so it is active wherever sglang-fx is installed).

Any test that takes the `fx_case` fixture is parametrised over (backend, case) for the backends
named by `--fx-backend` (repeatable), or every available backend when none is named. The
shipped test is `sglang_fx.conformance.test_conformance`; a third party runs it with
`pytest --pyargs sglang_fx.conformance --fx-backend NAME`.
"""

from __future__ import annotations

import tempfile

import pytest

from .cases import Case, cases_for
from .context import Context
from .runner import CaseResult, judge

_CONTEXTS = pytest.StashKey[dict]()
_SHARED = pytest.StashKey[tuple]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sglang-fx conformance")
    group.addoption("--fx-backend", action="append", default=[], metavar="NAME",
                    help="backend to run the conformance suite on (repeatable; default: every available backend)")
    group.addoption("--fx-device", default="cpu", metavar="DEVICE", help="device for the conformance suite (default: cpu)")


def _context(config: pytest.Config, backend: str) -> Context:
    """The backend's Context; all of them share one workdir (the tiny checkpoints) and one truth
    cache (transformers' and the reference backend's results: computed once, not per backend)."""
    contexts = config.stash.setdefault(_CONTEXTS, {})
    if backend not in contexts:
        if _SHARED not in config.stash:
            config.stash[_SHARED] = (tempfile.TemporaryDirectory(prefix="sglang-fx-conformance-"), {})
        workdir, truth = config.stash[_SHARED]
        contexts[backend] = Context(backend, device=config.getoption("fx_device"), workdir=workdir.name, truth=truth)
    return contexts[backend]


def _selected_backends(config: pytest.Config) -> list[str]:
    named = config.getoption("fx_backend")
    if named:
        return named
    from sglang_fx.registry import default_registry

    reg = default_registry()
    return [n for n in reg.names() if reg.info(n).unavailable is None]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "fx_case" not in metafunc.fixturenames:
        return
    params = []
    for backend in _selected_backends(metafunc.config):
        for case in cases_for(_context(metafunc.config, backend)):
            params.append(pytest.param((backend, case), id=f"{backend}:{case.name}"))
    metafunc.parametrize("fx_case", params)


@pytest.fixture
def fx_result(fx_case: tuple[str, Case], request: pytest.FixtureRequest) -> CaseResult:
    """Run the case and record its figures as the test's user properties (JUnit XML)."""
    backend, case = fx_case
    result = judge(case, _context(request.config, backend))
    for key in ("status", "max_abs_diff", "token_agreement", "detail"):
        request.node.user_properties.append((key, getattr(result, key)))
    return result


def pytest_unconfigure(config: pytest.Config) -> None:
    for ctx in config.stash.get(_CONTEXTS, {}).values():
        ctx.close()
    if _SHARED in config.stash:
        config.stash[_SHARED][0].cleanup()
