"""Prefill-decode (PD) disaggregation with sglang-fx backends on the CPU: real servers, KV moved
between them by Mooncake's transfer engine (TCP), SGLang's router in front.

The servers get SGLang's own PD flags only (--disaggregation-mode, --disaggregation-bootstrap-port):
what a CPU host needs beyond them is the plugin's job (sglang_fx/sglang/pd.py), so these tests
also check it. Nothing is skipped: a missing transfer engine, system library or router fails.

First, with no server running, the real launcher refuses `--disaggregation-transfer-backend
ascend` without or with wrong ASCEND_MF_* settings, before anything starts. Then three stages, at
most four servers alive at a time (tiny float32 checkpoints, --sleep-on-idle):
1. aggregated servers (mindspore, jax, reference_torch on Qwen3; reference_torch on DeepSeek-V3):
   the reference outputs (each prompt alone, greedy, with top-2 logprobs), then stopped;
2. a prefill and a decode server each of mindspore and jax, paired by SGLang's mini router
   (`sglang_router.launch_router --pd-disaggregation --mini-lb`): same backend on both sides,
   then mixed (mindspore prefill feeding jax decode, and the reverse);
3. reference_torch: a Qwen3 pair at --tp-size 2 on each side over SGLang's `ascend` transfer
   backend (the test-only memfabric_hybrid stand-in in tests/memfabric_stand_in, Mooncake's TCP
   engine underneath) behind SGLang's Rust router, its decode side retracting requests every
   third step (SGLANG_TEST_RETRACT, the cpu_tensor backup); a DeepSeek-V3 pair (MLA: one latent
   per token and layer moves) behind one mini router for its fault tests: its decode server is
   killed mid-stream, then started again at its address, then its prefill server is killed with
   requests queued.
Per pair: prompts one by one (the second hits the first's prefix in the prefill's radix cache)
must give the aggregated server's tokens exactly; the same prompts at once, and one streamed,
too, or differ only at a near-tie (the reference's top-1/top-2 logprob gap below 1e-3 at the
first difference, counted and printed), as in test_sglang_load.py. Mixed pairs are judged
against both frameworks' references with the same rule; same-backend pairs behind the mini
router also return the prompt's input logprobs (computed on prefill, merged by the router)
within 1e-4 of the aggregated server's. Then the decode server must not have
run a prefill (no "Prefill batch" in its log) and the prefill server must report KV moved
(sglang:kv_transfer_total_mb in its metrics), so a decode side that recomputed the prompt fails.
Faults: with the decode server killed, the client's stream and a new request end within 30 s;
restarted, the pair serves through the same router again; with the prefill server killed, its
queued requests fail within 30 s and the decode server's queues empty (SGLang's 300 s PD
bootstrap and waiting timeouts are lowered to 20 s here).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from sglang_fx.tiny import CORPUS

from .sglang_support import PYTHON, Server, free_port, installed_backends, stop_all, verdict

BACKENDS = ["mindspore", "jax", "reference_torch"]
STARTUP_TIMEOUT = 480  # s: four servers start at once on two cores
REQUEST_TIMEOUT = 120
#: SGLang's PD timeouts (300 s by default), lowered so that a dead peer fails requests quickly.
FAULT_TIMEOUTS = {"SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "20", "SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "20"}
MAX_NEW = 12
WORDS = re.findall(r"[A-Za-z]+", CORPUS)
_rng = random.Random(18)
SHARED = " ".join(_rng.choices(WORDS, k=24))
PROMPTS = [SHARED, SHARED + " " + " ".join(_rng.choices(WORDS, k=6))] + [" ".join(_rng.choices(WORDS, k=n)) for n in (3, 50, 1, 30)]


def body(prompt: str, **extra) -> dict:
    return {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True}, **extra}


def generate(url: str, payload: dict) -> dict:
    r = requests.post(url + "/generate", json=payload, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, (url, r.status_code, r.text[:1000])
    return r.json()


def streamed(url: str, payload: dict) -> tuple[list[int], int]:
    """A streamed /generate: (final output_ids, number of chunks)."""
    with requests.post(url + "/generate", json={**payload, "stream": True}, stream=True, timeout=REQUEST_TIMEOUT) as r:
        assert r.status_code == 200, (url, r.status_code, r.text[:1000])
        last, chunks = None, 0
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return last["output_ids"], chunks
                last, chunks = json.loads(data), chunks + 1
    raise AssertionError(f"{url}: a stream ended without [DONE]")


class Router:
    """`python -m sglang_router.launch_router --pd-disaggregation` (Rust, or --mini-lb) over one
    prefill/decode pair, in its own process group, its output in a log file."""

    def __init__(self, name: str, prefill: Server, bootstrap_port: int, decode: Server, log_dir, mini_lb: bool):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        cmd = [PYTHON, "-m", "sglang_router.launch_router", "--pd-disaggregation", *(["--mini-lb"] if mini_lb else []),
               "--prefill", prefill.url, str(bootstrap_port), "--decode", decode.url,
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router {name} exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.post(self.url + "/generate", json=body("the"), timeout=30).status_code == 200:
                    return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"router {name} not serving after 90 s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, 9)
        self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Spec:
    """A server of the module: its name, --model-impl, role ("aggregated", "prefill" or
    "decode"), checkpoint (a key of Fleet.models) and extra environment."""

    name: str
    backend: str
    role: str
    model: str = "qwen3"
    env: tuple[tuple[str, str], ...] = ()
    args: tuple[str, ...] = ()
    pythonpath: tuple[str, ...] = ()  # directories put first on the server's PYTHONPATH


class Fleet:
    """The module's servers: `stage(specs)` stops every server not in `specs` and starts the
    missing ones (all at once), so at most four are alive. A server of `specs` that died is
    started again at its old address (port and bootstrap port), where a router still sends."""

    def __init__(self, models: dict[str, str], log_dir):
        self.models, self.log_dir = models, log_dir
        self.servers: dict[str, Server] = {}
        self.ports: dict[str, int] = {}  # server name -> its HTTP port, kept across restarts
        self.starts: dict[str, int] = {}  # server name -> how many times it was started
        self.bootstrap: dict[str, int] = {}  # prefill server name -> its bootstrap port
        self.ready: set[str] = set()  # servers seen ready (once is enough)

    def stage(self, specs: list[Spec]) -> dict[str, Server]:
        assert len(specs) <= 4
        wanted = {spec.name for spec in specs}
        stop_all([s for n, s in self.servers.items() if n not in wanted])
        self.servers = {n: s for n, s in self.servers.items() if n in wanted and s.proc.poll() is None}
        self.ready &= set(self.servers)
        for spec in specs:
            if spec.name in self.servers:
                continue
            args = ["--model-impl", spec.backend]
            if spec.role in ("prefill", "decode"):
                if spec.role == "prefill":
                    self.bootstrap.setdefault(spec.name, free_port())
                    args += ["--enable-metrics"]
                bootstrap = self.bootstrap.get(spec.name) or free_port()  # decode: the router gives the prefill's
                args += ["--disaggregation-mode", spec.role, "--disaggregation-bootstrap-port", str(bootstrap),
                         "--nccl-port", str(free_port())]  # fmt: skip
            env = {**os.environ, **FAULT_TIMEOUTS, **dict(spec.env)}
            env["PYTHONPATH"] = os.pathsep.join([*spec.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            port = self.ports.setdefault(spec.name, free_port())  # the same address when restarted
            self.starts[spec.name] = self.starts.get(spec.name, 0) + 1
            self.servers[spec.name] = Server(spec.name, self.models[spec.model], (*args, *spec.args), env, self.log_dir, port=port)
        t0, fresh = time.monotonic(), sorted(set(self.servers) - self.ready)
        for spec in specs:
            self.servers[spec.name].wait_ready(STARTUP_TIMEOUT)
        self.ready.update(wanted)
        if fresh:
            print(f"\n{', '.join(fresh)} started and ready in {time.monotonic() - t0:.0f} s")
        return self.servers

    def stop(self) -> None:
        stop_all(list(self.servers.values()))
        self.servers = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    missing = [b for b in BACKENDS if b not in installed_backends()]
    if missing:
        pytest.fail(f"backends not installed: {missing} (make setup installs them)")
    for module, sub in (("sglang_router", "launch_router"), ("mooncake", "engine")):
        r = subprocess.run([PYTHON, "-c", f"import {module}.{sub}"], capture_output=True, text=True)
        assert r.returncode == 0, f"PD needs {module}.{sub} (make setup installs it):\n{r.stderr[-3000:]}"
    from sglang_fx.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("sglang_pd")
    f = Fleet({arch: str(make_tiny_model(arch, root / arch)) for arch in ("qwen3", "deepseek_v3")}, root)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def references(fleet):
    """{server: [each prompt alone on an aggregated server, with top-2 logprobs]}: "mindspore",
    "jax", "reference_torch" (Qwen3) and "mla" (DeepSeek-V3 on reference_torch)."""
    specs = [Spec(f"agg-{b}", b, "aggregated") for b in BACKENDS] + [Spec("agg-mla", "reference_torch", "aggregated", "deepseek_v3")]
    servers = fleet.stage(specs)
    refs = {s.name.removeprefix("agg-"): [generate(servers[s.name].url, body(p, return_logprob=True, top_logprobs_num=2))
                                          for p in PROMPTS] for s in specs}  # fmt: skip
    for b in BACKENDS:  # and the prompt's own logprobs (input logprobs), for one prompt
        refs[f"{b}:input"] = generate(servers[f"agg-{b}"].url, INPUT_LOGPROBS)
    return refs


#: A request for the logprobs of the prompt's tokens too (SGLang's PD computes them on prefill).
INPUT_LOGPROBS = body(PROMPTS[3], return_logprob=True, logprob_start_len=0)


def check_input_logprobs(name: str, router: Router, ref: dict) -> None:
    """The prompt's logprobs through the pair (the router merges the prefill's) equal the
    aggregated server's: the same tokens, values within 1e-4 (float32)."""
    got = generate(router.url, INPUT_LOGPROBS)
    assert got["output_ids"] == ref["output_ids"], name
    mine, theirs = got["meta_info"]["input_token_logprobs"], ref["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in mine] == [t[1] for t in theirs], f"{name}: input tokens differ"
    diff = max(abs(a[0] - b[0]) for a, b in zip(mine, theirs) if a[0] is not None and b[0] is not None)
    print(f"{name}: {len(mine)} input logprobs, max difference to the aggregated server {diff:.2e}")
    assert diff < 1e-4, f"{name}: input logprobs differ by {diff}"


def check_pair(name: str, router: Router, refs: list[list[dict]], exact: bool) -> int:
    """Prompts one by one (exact when `exact`), all at once and one streamed (near-ties allowed);
    returns the number of near-ties. `refs`: the references each output may match."""

    def judge(k: int, ids: list[int], allow_tie: bool) -> str:
        verdicts = [verdict(ids, r[k]) for r in refs]
        if "same" in verdicts:
            return "same"
        assert allow_tie and "near-tie" in verdicts, f"{name}, prompt {k} {PROMPTS[k][:40]!r}: {verdicts}"
        return "near-tie"

    one_by_one = [generate(router.url, body(p))["output_ids"] for p in PROMPTS]
    verdicts = [judge(k, ids, not exact) for k, ids in enumerate(one_by_one)]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: generate(router.url, body(p))["output_ids"], PROMPTS))
    verdicts += [judge(k, ids, True) for k, ids in enumerate(together)]
    ids, chunks = streamed(router.url, body(PROMPTS[3]))
    assert chunks > 1, f"{name}: the stream came in one chunk"
    verdicts.append(judge(3, ids, True))
    ties = verdicts.count("near-tie")
    print(f"{name}: {len(verdicts)} outputs, {len(verdicts) - ties} same as the aggregated server, {ties} near-ties")
    return ties


def check_decode_only(prefill: Server, decode: Server, requests_sent: int) -> None:
    """The decode server ran no prefill; the prefill server moved KV for every request."""
    log = decode.log.read_text(errors="replace")
    assert "Decode batch" in log or requests_sent == 0, f"{decode.name} logged no decode step"
    prefills = log.count("Prefill batch")
    assert prefills == 0, f"{decode.name} ran {prefills} prefill batches: it recomputed prompts instead of receiving KV"
    metrics = requests.get(prefill.url + "/metrics", timeout=30).text
    count = re.search(r"^sglang:kv_transfer_total_mb_count\{[^}]*\} ([0-9.e+]+)$", metrics, re.M)
    total = re.search(r"^sglang:kv_transfer_total_mb_sum\{[^}]*\} ([0-9.e+-]+)$", metrics, re.M)
    assert count and total, f"{prefill.name}: no KV transfer metrics:\n{metrics[:2000]}"
    assert float(count.group(1)) >= requests_sent and float(total.group(1)) > 0, (count.group(0), total.group(0))
    print(f"{prefill.name} -> {decode.name}: {float(count.group(1)):.0f} KV transfers, {float(total.group(1)):.3f} MB")


REQUESTS_PER_CHECK = 2 * len(PROMPTS) + 1  # (at least)
STAGE2 = [Spec(f"{b}-{r}", b, r) for b in ("mindspore", "jax") for r in ("prefill", "decode")]
#: reference_torch, Qwen3, --tp-size 2 on each side (the guide's form, where each side runs
#: --tp-size 4: every TP rank sends or receives its own heads' KV), over SGLang's `ascend`
#: transfer backend, its engine the test-only memfabric_hybrid stand-in (tests/memfabric_stand_in:
#: Mooncake's TCP engine underneath), and SGLang's test retraction (every 3rd decode step) on the
#: decode side, so requests are retracted to the cpu_tensor backup and resumed. DeepSeek-V3 (MLA,
#: reference_torch, tp 1) over Mooncake.
STAND_IN = str(Path(__file__).parent / "memfabric_stand_in")
ASCEND = dict(args=("--disaggregation-transfer-backend", "ascend", "--tp-size", "2"), pythonpath=(STAND_IN,),
              env=(("ASCEND_MF_STORE_URL", f"tcp://127.0.0.1:{free_port()}"), ("ASCEND_MF_TRANSFER_PROTOCOL", "sdma")))  # fmt: skip
STAGE3 = [Spec("reference_torch-prefill", "reference_torch", "prefill", **ASCEND),
          Spec("reference_torch-decode", "reference_torch", "decode", **{**ASCEND, "env": (*ASCEND["env"], ("SGLANG_TEST_RETRACT", "1"))}),
          Spec("mla-prefill", "reference_torch", "prefill", "deepseek_v3"),
          Spec("mla-decode", "reference_torch", "decode", "deepseek_v3")]  # fmt: skip
RETRACTED = re.compile(r"Testing retraction\. #retracted_reqs: (\d+)")
FAULT_DEADLINE = 30  # s: a request cut by a dead peer has its answer (an error) by then


def pair_router(fleet, prefill: Server, decode: Server, mini_lb: bool = True) -> Router:
    return Router(f"router-{prefill.name}-{decode.name}", prefill, fleet.bootstrap[prefill.name], decode, fleet.log_dir, mini_lb)


#: The ascend transfer backend's start-up checks through the real launcher (no model is loaded):
#: {case: (role, environment, PYTHONPATH entries, messages the launcher must exit with)}.
ASCEND_REFUSED = {
    "no store URL, no memfabric_hybrid": ("prefill", {}, (), [
        "--disaggregation-transfer-backend ascend needs ASCEND_MF_STORE_URL",
        "--disaggregation-transfer-backend ascend needs the package memfabric-hybrid"]),
    "bad store URL and protocol": ("decode", {"ASCEND_MF_STORE_URL": "10.0.0.1", "ASCEND_MF_TRANSFER_PROTOCOL": "hccs"}, (STAND_IN,), [
        "ASCEND_MF_STORE_URL='10.0.0.1' is not of the form SCHEME://HOST:PORT",
        "ASCEND_MF_TRANSFER_PROTOCOL='hccs' is not a transfer protocol of the installed memfabric_hybrid (device_rdma, sdma)"]),
}  # fmt: skip
REFUSAL_TIMEOUT = 90  # s: the launcher's imports on a loaded 2-core machine, no model load


def test_ascend_settings_are_refused_by_the_launcher_before_anything_starts(fleet):
    """`python -m sglang.launch_server ... --disaggregation-transfer-backend ascend` with the
    guide's variables missing or wrong: the launcher exits non-zero, quickly, with every problem
    in one error, before a scheduler starts (SGLang itself would fail at the first transfer)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ASCEND_MF_")}
    servers = {}
    for case, (role, env, pythonpath, _) in ASCEND_REFUSED.items():
        env = {**base, **env, "PYTHONPATH": os.pathsep.join([*pythonpath, base.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        args = ("--model-impl", "reference_torch", "--disaggregation-mode", role, "--disaggregation-transfer-backend", "ascend")
        servers[case] = Server(f"ascend-refused-{role}", fleet.models["qwen3"], args, env, fleet.log_dir)
    t0 = time.monotonic()
    try:
        for case, server in servers.items():
            code = server.wait_exit(max(1.0, REFUSAL_TIMEOUT - (time.monotonic() - t0)))
            out = server.output(20000)
            assert code is not None, f"{case}: the launcher still runs after {REFUSAL_TIMEOUT} s:\n{out[-4000:]}"
            print(f"{case}: the launcher exited with {code} after {time.monotonic() - t0:.0f} s")
            assert code != 0, out[-4000:]
            role = ASCEND_REFUSED[case][0]
            errors = [line for line in out.splitlines() if line.startswith(f"ValueError: --disaggregation-mode {role}: ")]
            assert errors, f"{case}: no start-up error:\n{out[-4000:]}"
            error = errors[-1]
            for message in ASCEND_REFUSED[case][3]:
                assert message in error, (message, error)
            assert "Load weight" not in out, f"{case}: a model was loaded before the refusal:\n{out[-4000:]}"
    finally:
        stop_all(list(servers.values()))


@pytest.mark.parametrize("prefill_backend, decode_backend",
                         [("mindspore", "mindspore"), ("jax", "jax"), ("mindspore", "jax"), ("jax", "mindspore")])  # fmt: skip
def test_pd_matches_aggregated(fleet, references, prefill_backend, decode_backend):
    servers = fleet.stage(STAGE2)
    prefill, decode = servers[f"{prefill_backend}-prefill"], servers[f"{decode_backend}-decode"]
    router = pair_router(fleet, prefill, decode)
    try:
        same = prefill_backend == decode_backend
        refs = [references[decode_backend]] if same else [references[prefill_backend], references[decode_backend]]
        check_pair(f"PD {prefill_backend} -> {decode_backend}", router, refs, exact=same)
        if same:
            check_input_logprobs(f"PD {prefill_backend}", router, references[f"{prefill_backend}:input"])
    finally:
        router.stop()
    check_decode_only(prefill, decode, REQUESTS_PER_CHECK)


def test_reference_torch_tp2_ascend_pair_behind_the_rust_router_with_decode_retraction(fleet, references):
    """Two TP ranks on each side, each moving its own heads' KV through SGLang's Ascend transfer
    path (its KV manager, sender, receiver and config store, with the memfabric_hybrid stand-in),
    the Rust router in front and retraction on the decode side: the tokens of an aggregated
    reference_torch server (tp 1) exactly, one by one."""
    servers = fleet.stage(STAGE3)
    prefill, decode = servers["reference_torch-prefill"], servers["reference_torch-decode"]
    router = pair_router(fleet, prefill, decode, mini_lb=False)
    try:
        check_pair("PD reference_torch tp 2 (ascend transfer, Rust router, decode retracting)", router,
                   [references["reference_torch"]], exact=True)  # fmt: skip
    finally:
        router.stop()
    check_decode_only(prefill, decode, REQUESTS_PER_CHECK)
    log = decode.log.read_text(errors="replace")
    retracted = sum(int(n) for n in RETRACTED.findall(log))
    print(f"{decode.name}: {retracted} requests retracted (cpu_tensor backup) and resumed")
    assert retracted > 0, f"{decode.name}: no retraction in its log"
    for server in (prefill, decode):  # two ranks really ran on each side
        ranks = set(re.findall(r"\bTP(\d+)\b", server.log.read_text(errors="replace")))
        assert ranks >= {"0", "1"}, f"{server.name}: TP ranks in its log: {sorted(ranks)}"


@pytest.fixture(scope="module")
def mla_router(fleet, references):
    """The DeepSeek-V3 pair's mini router, one for all its tests: after the decode server dies
    and comes back at its address, this same router must serve again."""
    servers = fleet.stage(STAGE3)
    router = pair_router(fleet, servers["mla-prefill"], servers["mla-decode"])
    yield router
    router.stop()


def test_deepseek_v3_mla_pair(fleet, references, mla_router):
    """MLA: one latent per token and layer moves instead of K and V."""
    servers = fleet.stage(STAGE3)
    prefill, decode = servers["mla-prefill"], servers["mla-decode"]
    check_pair("PD DeepSeek-V3 reference_torch", mla_router, [references["mla"]], exact=True)
    check_decode_only(prefill, decode, REQUESTS_PER_CHECK)


def test_decode_killed_mid_stream_fails_requests_quickly(fleet, mla_router):
    """The decode server dies while streaming: the client's stream ends (an error, not a hang)
    within 30 s, and so does a new request to the pair; the prefill server keeps running. The
    decode server stays dead for the next test."""
    servers = fleet.stage(STAGE3)
    prefill, decode = servers["mla-prefill"], servers["mla-decode"]
    long = {**body(PROMPTS[0]), "sampling_params": {"temperature": 0, "max_new_tokens": 3000, "ignore_eos": True}, "stream": True}
    t0 = None
    outcome = "stream completed"
    try:
        with requests.post(mla_router.url + "/generate", json=long, stream=True, timeout=FAULT_DEADLINE) as r:
            for k, line in enumerate(r.iter_lines(decode_unicode=True)):
                if k == 4:  # streaming: now kill the decode server
                    os.killpg(decode.proc.pid, signal.SIGKILL)
                    t0 = time.monotonic()
                if t0 is not None and ("error" in line or line.strip() == "data: [DONE]"):
                    outcome = f"stream ended: {line[:200]}"
                    break
    except requests.RequestException as e:
        outcome = f"{type(e).__name__}"
    assert t0 is not None, "the stream ended before the decode server was killed"
    took = time.monotonic() - t0
    print(f"decode server killed mid-stream: {outcome} after {took:.1f} s")
    assert took < FAULT_DEADLINE and outcome != "stream completed", (outcome, took)
    t1 = time.monotonic()
    with contextlib.suppress(requests.RequestException):
        r = requests.post(mla_router.url + "/generate", json=body(PROMPTS[2]), timeout=FAULT_DEADLINE)
        assert r.status_code != 200, "a request succeeded with the decode server dead"
    print(f"a new request with the decode server dead: failed after {time.monotonic() - t1:.1f} s")
    assert time.monotonic() - t1 < FAULT_DEADLINE + 1
    assert prefill.proc.poll() is None, f"the prefill server died with its peer:\n{prefill.output()}"


def test_decode_restarted_the_pair_serves_again_through_the_same_router(fleet, references, mla_router):
    """The killed decode server starts again at its address; the router and the prefill server
    were left running: the pair gives the aggregated server's tokens again, and the new decode
    server receives KV rather than recomputing."""
    servers = fleet.stage(STAGE3)  # starts the dead decode server again, at its old port
    assert fleet.starts["mla-decode"] == 2, "the decode server was not restarted (the previous test did not kill it)"
    prefill, decode = servers["mla-prefill"], servers["mla-decode"]
    check_pair("PD DeepSeek-V3, decode server restarted", mla_router, [references["mla"]], exact=True)
    check_decode_only(prefill, decode, REQUESTS_PER_CHECK)


def pending(server: Server) -> int:
    """Requests a decode server holds, from SGLang's /v1/loads: running, plus waiting, which
    there counts its preallocation, transfer and retracted queues too. The scheduler answers
    this call itself, so a scheduler that hangs fails it."""
    loads = requests.get(server.url + "/v1/loads", params={"include": "core"}, timeout=10).json()["loads"]
    return sum(load["num_running_reqs"] + load["num_waiting_reqs"] for load in loads)


def test_prefill_killed_with_requests_queued_fails_them_quickly(fleet, mla_router):
    """The prefill server's scheduler is stopped (SIGSTOP) while requests arrive, so they queue
    on both sides (the decode server holds them, waiting for their KV); then the prefill server is
    killed. Every client gets an error within 30 s, and nothing hangs: the decode server drops the
    requests (its queues empty) and stays up."""
    servers = fleet.stage(STAGE3)
    prefill, decode = servers["mla-prefill"], servers["mla-decode"]

    schedulers = [p for p in psutil.Process(prefill.proc.pid).children(recursive=True) if "sglang::scheduler" in " ".join(p.cmdline())]
    assert schedulers, f"{prefill.name}: no scheduler process found"

    def send(k: int) -> tuple[object, float]:
        try:
            answer = requests.post(mla_router.url + "/generate", json=body(PROMPTS[k]), timeout=2 * FAULT_DEADLINE).status_code
        except requests.RequestException as e:
            answer = type(e).__name__
        return answer, time.monotonic()

    n = 4
    for p in schedulers:
        p.suspend()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(send, k) for k in range(n)]
        deadline = time.monotonic() + 15
        while (queued := pending(decode)) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        assert queued == n and not any(f.done() for f in futures), (queued, [f.result() for f in futures if f.done()])
        os.killpg(prefill.proc.pid, signal.SIGKILL)  # SIGKILL reaches stopped processes too
        t0 = time.monotonic()
        outcomes = [f.result() for f in futures]
    took = max(t for _, t in outcomes) - t0
    print(f"prefill server killed with {n} requests queued: {[a for a, _ in outcomes]} within {took:.1f} s")
    assert all(a != 200 for a, _ in outcomes) and took < FAULT_DEADLINE, outcomes
    while (left := pending(decode)) and time.monotonic() - t0 < FAULT_DEADLINE:
        time.sleep(1)
    print(f"{decode.name}: {left} requests left {time.monotonic() - t0:.1f} s after the kill")
    assert left == 0, f"{decode.name} still holds {left} requests of the dead prefill server"
    assert decode.proc.poll() is None, f"the decode server died with its peer:\n{decode.output()}"
