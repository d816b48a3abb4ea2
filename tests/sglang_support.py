"""Helpers shared by the SGLang end-to-end tests (test_sglang_engine.py, test_sglang_server.py):
test-only backend distributions declared in a temporary dist-info, SGLang servers run as
subprocesses with every wait bounded and every process group terminated, and how greedy answers
are compared (with a standalone Session's answers in the same format)."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

#: A test-only backend: the reference_torch hooks under another name, declaring `devices`.
DEVICE_BACKEND = '''
"""Test-only sglang-fx backend: the reference_torch hooks under another name, on other devices
and (when ARCHITECTURES is not None) for fewer architectures."""
import dataclasses
from sglang_fx import hookimpl
from sglang_fx_reference_torch import plugin as ref

NAME, DEVICES, ARCHITECTURES = {name!r}, {devices!r}, {architectures!r}

@hookimpl
def sglang_fx_backend_info():
    info = ref.sglang_fx_backend_info()
    caps = dataclasses.replace(info.capabilities, dtypes={{d: ref.FLOATS for d in DEVICES}},
                               architectures=frozenset(ARCHITECTURES or info.capabilities.architectures))
    return dataclasses.replace(info, name=NAME, capabilities=caps)

sglang_fx_make_exchange = ref.sglang_fx_make_exchange
sglang_fx_make_kv_cache = ref.sglang_fx_make_kv_cache
sglang_fx_make_attention = ref.sglang_fx_make_attention
sglang_fx_make_runner = ref.sglang_fx_make_runner
'''

#: A test-only backend whose framework is missing: it reports `unavailable`, as a real backend
#: does when its framework cannot be imported. (Its factories are reference_torch's, so the
#: hook signatures always match the hookspecs; they are never called.)
UNAVAILABLE_BACKEND = '''
"""Test-only sglang-fx backend whose framework ("nosuchframework") is not installed."""
from sglang_fx import hookimpl
from sglang_fx.spi import BackendInfo
from sglang_fx_reference_torch import plugin as ref

NAME = {name!r}

@hookimpl
def sglang_fx_backend_info():
    try:
        import nosuchframework  # noqa: F401
    except ImportError as e:
        return BackendInfo(name=NAME, framework="nosuchframework", framework_version=None, capabilities=None,
                           unavailable=f"{{e}}: pip install nosuchframework")
    raise AssertionError("nosuchframework should not be importable in the tests")

sglang_fx_make_exchange = ref.sglang_fx_make_exchange
sglang_fx_make_kv_cache = ref.sglang_fx_make_kv_cache
sglang_fx_make_attention = ref.sglang_fx_make_attention
sglang_fx_make_runner = ref.sglang_fx_make_runner
'''


def installed_backends() -> set[str]:
    return {ep.name for ep in md.entry_points(group="sglang_fx.backends")}


def available(name: str) -> bool:
    """Whether the sglang-fx backend `name` is installed and can run here."""
    from sglang_fx.registry import Registry

    try:
        return name in installed_backends() and Registry().info(name).unavailable is None
    except Exception:
        return False


def has_plugin_entry_point() -> bool:
    return any(ep.value.startswith("sglang_fx.sglang.plugin") for ep in md.entry_points(group="sglang.srt.plugins"))


def entry_points_env(root: Path, backends: dict[str, str]) -> dict[str, str]:
    """Declare test backends ({name: plugin module source}) in a dist-info under `root`, and
    the SGLang plugin entry point if the installed sglang-fx lacks it. Returns os.environ with
    `root` on PYTHONPATH, so SGLang's subprocesses see the same entry points."""
    lines = ["[sglang_fx.backends]"]
    for name, source in backends.items():
        module = f"sglang_fx_test_backend_{name}"
        (root / f"{module}.py").write_text(source)
        lines.append(f"{name} = {module}")
    if not has_plugin_entry_point():
        lines += ["[sglang.srt.plugins]", "sglang_fx = sglang_fx.sglang.plugin:register"]
    dist = root / "sglang_fx_test_entry_points-0.0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang-fx-test-entry-points\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def free_port() -> int:
    """A free port below the ephemeral range (see sglang_fx.distributed.free_ports)."""
    from sglang_fx.distributed import free_ports

    return free_ports(1)[0]


# --sleep-on-idle: an idle SGLang 0.5.23 scheduler on CPU otherwise spins at 75-100% of a core
# (measured for native, mindspore and reference_torch alike), slowing every other server a test
# module runs; with it, about 1%.
SERVER_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
                "--disable-cuda-graph", "--max-total-tokens", "65536", "--sleep-on-idle")  # fmt: skip


class Server:
    """`python -m sglang.launch_server` (or another launcher module) in its own process group,
    on loopback, its output in a log file. Every wait is bounded; `stop()` always ends the
    whole group (SGLang's scheduler and detokenizer processes included)."""

    def __init__(self, name: str, model: str, args: tuple[str, ...], env: dict, log_dir: Path,
                 module: str = "sglang.launch_server", python: str = PYTHON, cwd: Path = ROOT, port: int | None = None):  # fmt: skip
        """python, cwd: the interpreter (another environment's, say) and the working directory;
        port: a given one restarts a server at the same address (default: a free one)."""
        self.name, self.port = name, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        env = {**env, "SGLANG_USE_CPU_ENGINE": "1"}
        cmd = [python, "-m", module, "--model-path", model, *SERVER_FLAGS, "--host", "127.0.0.1",
               "--port", str(self.port), *args]  # fmt: skip
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                         start_new_session=True)  # fmt: skip

    def output(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""

    def wait_ready(self, timeout: float) -> None:
        """Until /health_generate answers 200 (a real generation ran). Raises RuntimeError with
        the log tail if the server exits or the deadline passes."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/health_generate", timeout=10).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"server {self.name} not ready after {timeout:.0f}s:\n{self.output()}")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status, or None if the process is still running after `timeout` s."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        stop_all([self])


def stop_all(servers: list[Server], grace: float = 20.0) -> None:
    """SIGTERM every server's process group at once (SGLang cleans its children up), wait up to
    `grace` s in all, then SIGKILL whatever is left of each group."""
    for s in servers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for s in servers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    for s in servers:  # a leader that ignored SIGTERM, or a child that outlived its leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(s.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            s.proc.wait(timeout=10)


#: A greedy token may differ from a reference run only at a near-tie: where the reference's top-1
#: minus top-2 logprob at the first differing token is below this (reduction order differs
#: between runs that batch, chunk or split differently).
NEAR_TIE = 1e-3


def verdict(got: list[int], ref: dict, near_tie: float = NEAR_TIE) -> str:
    """"same", "near-tie" (first difference where the reference's top-2 gap < near_tie; `ref` is
    a /generate answer with output_top_logprobs) or a description of the difference."""
    want = ref["output_ids"]
    if got == want:
        return "same"
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i >= min(len(got), len(want)):
        return f"length {len(got)} != {len(want)}"
    top = ref["meta_info"]["output_top_logprobs"][i]
    gap = top[0][0] - top[1][0]
    return "near-tie" if gap < near_tie else f"token {i}: {got[i]} != {want[i]} (top-2 gap {gap:.3g})"


def leading_agreement(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b have in common."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def logprob_spread(got: list[dict], ref: list[dict]) -> float:
    """The largest |difference| between two runs' logprobs of the same chosen token, over every
    answer's positions before its first differing token (answers in /generate's format, with
    output_top_logprobs): how far two computations of the same model already disagree where
    their greedy choices still agree."""
    spread = 0.0
    for g, r in zip(got, ref):
        for k in range(leading_agreement(g["output_ids"], r["output_ids"])):
            a, b = g["meta_info"]["output_top_logprobs"][k][0][0], r["meta_info"]["output_top_logprobs"][k][0][0]
            spread = max(spread, abs(a - b))
    return spread


def flip_verdict(got: dict, ref: dict, spread: float) -> tuple[str, str]:
    """Two greedy answers of a model whose greedy tokens may flip at rounding boundaries (W8A8):
    (kind, verdict(got, ref)) where kind is "same", "near-tie", "rounding flip" (the reference's
    top-2 gap at the first difference is below 2 x `spread`, the logprob_spread of the two runs:
    each of the two logprobs may have moved by that much) or "other"."""
    v = verdict(got["output_ids"], ref)
    if v in ("same", "near-tie"):
        return v, v
    return ("rounding flip" if verdict(got["output_ids"], ref, near_tie=2 * spread) == "near-tie" else "other"), v


def session_answers(session, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy answers of a standalone `sglang_fx.generate.Session` to token-id prompts, in the
    format of examples/sglang_compare.py's (SGLang's /generate): per prompt {"output_ids", "meta_info":
    {"output_top_logprobs": per output token [[logprob, token id, None] x 2], best first}}, the
    logprobs log_softmax of the float32 logits (as SGLang's at temperature 0). One extend step
    for all prompts, then one decode step per token; the sequences are released after."""
    import torch

    made = [session.new_sequence(p) for p in prompts]
    seqs = [seq for seq, _ in made]
    out = [{"output_ids": [], "meta_info": {"output_top_logprobs": []}} for _ in prompts]
    try:
        logits = session.forward(seqs, [list(p[shared:]) for p, (_, shared) in zip(prompts, made)])
        for step in range(max_new_tokens):
            top = torch.log_softmax(logits.float(), -1).topk(2, -1)
            for o, lp, ids in zip(out, top.values.tolist(), top.indices.tolist()):
                o["output_ids"].append(ids[0])
                o["meta_info"]["output_top_logprobs"].append([[lp[0], ids[0], None], [lp[1], ids[1], None]])
            if step + 1 < max_new_tokens:
                logits = session.forward(seqs, [[o["output_ids"][-1]] for o in out])
    finally:
        for s in seqs:
            session.release(s)
    return out


def rank_answers(parallel, backend: str, model: str, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """`session_answers` of a Session of `backend` on `model` as one rank of a tensor-parallel
    world: the function `sglang_fx.distributed.run_parallel` runs on every rank."""
    from sglang_fx.generate import Session

    session = Session(backend, model, dtype="float32", page_size=1, max_total_tokens=2048, parallel=parallel)
    return session_answers(session, prompts, max_new_tokens)
