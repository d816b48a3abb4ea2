"""Run the conformance cases against one backend: progress, a table, a JSON report.

A case in the backend's `known_gaps` that fails counts as expected ("known gap"); one that
passes fails the run ("unexpected pass"), so the list cannot go stale.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

from .cases import Case, Outcome, cases_for, model_checkpoints
from .context import Context


@dataclass(frozen=True)
class CaseResult:
    name: str
    passed: bool  # counts toward the run passing (a known gap that failed counts as passed)
    status: str  # "pass", "fail", "error", "known gap", "unexpected pass", "skipped"
    max_abs_diff: float | None
    token_agreement: float | None
    detail: str
    seconds: float


def judge(case: Case, ctx: Context) -> CaseResult:
    """Run one case and apply the backend's known-gap list. A case that does not apply to the
    backend's declared capabilities is skipped with the reason; a failing one names its contract."""
    start = time.perf_counter()
    reason = case.skip_reason(ctx)
    if reason is not None:
        return CaseResult(case.name, True, "skipped", None, None, reason, 0.0)
    try:
        out = case.run(ctx)
        status = "pass" if out.passed else "fail"
    except Exception as e:  # a crashing case is a failing case, with its reason
        out = Outcome(False, None, None, f"{type(e).__name__}: {e}")
        status = "error"
        if os.environ.get("SGLANG_FX_DEBUG"):
            traceback.print_exc()
    gap = ctx.backend.info.known_gaps.get(case.name)
    if gap is not None:
        if out.passed:
            status, passed, detail = "unexpected pass", False, f"listed as a known gap ({gap}) but passes: remove it from the list"
        else:
            status, passed, detail = "known gap", True, f"{gap} [{out.detail}]"
    else:
        passed, detail = out.passed, out.detail
    if not passed and case.contract:
        detail = f"{detail} [contract: {case.contract}]"
    return CaseResult(case.name, passed, status, out.max_abs_diff, out.token_agreement, detail, time.perf_counter() - start)


@dataclass(frozen=True)
class Report:
    backend: str
    passed: bool
    cases: list[CaseResult]

    def to_json(self) -> dict:
        return {"backend": self.backend, "passed": self.passed, "cases": [asdict(c) for c in self.cases]}

    def table(self) -> str:
        rows = [("case", "result", "max abs diff", "tokens", "detail")]
        for c in self.cases:
            diff = "-" if c.max_abs_diff is None else f"{c.max_abs_diff:.2e}"
            tok = "-" if c.token_agreement is None else f"{c.token_agreement:.0%}"
            rows.append((c.name, c.status, diff, tok, c.detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * (sum(widths) + 8 + 6))
        skipped = sum(c.status == "skipped" for c in self.cases)
        ok = sum(c.passed for c in self.cases) - skipped
        lines.append(f"{self.backend}: {ok} passed, {len(self.cases) - ok - skipped} failed" + (f", {skipped} skipped" if skipped else ""))
        return "\n".join(lines)


def starting_with(prefixes: Sequence[str]) -> Callable[[str], bool]:
    """A case selector for `run`: names starting with one of `prefixes` (picklable, as the
    ranks of a tensor-parallel run need it)."""
    return functools.partial(_starts_with, tuple(prefixes))


def _starts_with(prefixes: tuple[str, ...], name: str) -> bool:
    return name.startswith(prefixes)


def run(
    backend: str,
    *,
    device: str = "cpu",
    select: Callable[[str], bool] | None = None,
    progress: TextIO | None = sys.stderr,
    tp_size: int = 1,
    ep_size: int = 1,
) -> Report:
    """Run the backend's cases. tp_size > 1: the model cases, sharded over tp_size processes
    (experts over ep_size of them) of one world (`sglang_fx.distributed`), against transformers,
    the reference and the same backend at tp=1; every rank must pass."""
    if tp_size == 1 and ep_size == 1:
        ctx = Context(backend, device=device)
        try:
            results = _run_cases(ctx, select, progress)
        finally:
            ctx.close()
        return Report(backend, all(r.passed for r in results), results)
    from sglang_fx.distributed import run_parallel

    with tempfile.TemporaryDirectory(prefix="sglang-fx-conformance-tp-") as workdir:
        # The checkpoints are made here once, before the ranks start (they only read them).
        ctx = Context(backend, device=device, workdir=workdir)
        for arch, variant in model_checkpoints(ctx, tp_size):
            ctx.checkpoint(arch, variant)
        per_rank = run_parallel(_rank_cases, tp_size, ep_size=ep_size, args=(backend, device, workdir, select, progress is not None))
    results = per_rank[0]
    for rank, theirs in enumerate(per_rank[1:], 1):
        for i, (r, other) in enumerate(zip(results, theirs)):
            if r.passed and not other.passed:
                results[i] = replace(other, detail=f"rank {rank}: {other.detail}")
    return Report(f"{backend} (tp={tp_size}, ep={ep_size})", all(r.passed for r in results), results)


def listing(backend: str, *, device: str = "cpu", tp_size: int = 1, ep_size: int = 1) -> str:
    """The cases `run` would run, one line each: name, what it checks, the contract it tests (or
    why it is skipped for this backend). Runs nothing."""
    from sglang_fx.parallel import SINGLE, Group, Parallel, Rendezvous

    parallel = SINGLE if tp_size == 1 else Parallel(Group("tp", tuple(range(tp_size)), 0), ep_size,
                                                    rendezvous=Rendezvous("127.0.0.1", 0, tp_size, 0))  # fmt: skip
    ctx = Context(backend, device=device, parallel=parallel)
    try:
        cases = cases_for(ctx)
        width = max(len(c.name) for c in cases)
        lines = []
        for c in cases:
            reason = c.skip_reason(ctx)
            tail = f"SKIPPED: {reason}" if reason else f"{c.checks} [{c.contract}]"
            lines.append(f"{c.name:<{width}}  {tail}")
        return "\n".join(lines)
    finally:
        ctx.close()


def _run_cases(ctx: Context, select: Callable[[str], bool] | None, progress: TextIO | None) -> list[CaseResult]:
    cases = [c for c in cases_for(ctx) if select is None or select(c.name)]
    results = []
    for i, case in enumerate(cases, 1):
        if progress:
            print(f"[{i:>3}/{len(cases)}] {case.name} ...", end="", file=progress, flush=True)
        r = judge(case, ctx)
        results.append(r)
        if progress:
            print(f" {r.status} ({r.seconds:.1f}s)", file=progress, flush=True)
    return results


def _rank_cases(parallel, backend: str, device: str, workdir: str, select, progress: bool) -> list[CaseResult]:
    """One rank of a tensor-parallel conformance run (rank 0 shows progress). On an accelerator
    each rank takes the device of its rank's index ("npu" -> "npu:0", "npu:1", ...)."""
    kind = device.partition(":")[0]
    device = device if kind == "cpu" else f"{kind}:{parallel.tp_rank}"
    ctx = Context(backend, device=device, workdir=workdir, parallel=parallel)
    return _run_cases(ctx, select, sys.stderr if progress and parallel.tp_rank == 0 else None)


def write_json(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")
