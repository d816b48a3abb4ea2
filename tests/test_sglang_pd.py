"""Prefill-decode (PD) disaggregation with sglang-fx backends on the CPU: real servers, KV moved
between them by Mooncake's transfer engine (TCP), SGLang's router in front.

The servers get SGLang's own PD flags only (--disaggregation-mode, --disaggregation-bootstrap-port):
what a CPU host needs beyond them is the plugin's job (sglang_fx/sglang/pd.py), so these tests
also check it. Nothing is skipped: a missing transfer engine, system library or router fails.

Three stages, at most four servers alive at a time (tiny float32 Qwen3, --sleep-on-idle):
1. aggregated servers of mindspore, jax and reference_torch: the reference outputs (each prompt
   alone, greedy, with top-2 logprobs), then stopped;
2. a prefill and a decode server each of mindspore and jax, paired by SGLang's mini router
   (`sglang_router.launch_router --pd-disaggregation --mini-lb`): same backend on both sides,
   then mixed (mindspore prefill feeding jax decode, and the reverse);
3. a reference_torch pair behind SGLang's Rust router.
Per pair: prompts one by one (the second hits the first's prefix in the prefill's radix cache)
must give the aggregated server's tokens exactly; the same prompts at once, and one streamed,
too, or differ only at a near-tie (the reference's top-1/top-2 logprob gap below 1e-3 at the
first difference, counted and printed), as in test_sglang_load.py. Mixed pairs are judged
against both frameworks' references with the same rule. Then the decode server must not have
run a prefill (no "Prefill batch" in its log) and the prefill server must report KV moved
(sglang:kv_transfer_total_mb in its metrics), so a decode side that recomputed the prompt fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sglang_fx.tiny import CORPUS

from .sglang_support import PYTHON, Server, free_port, installed_backends, stop_all

BACKENDS = ["mindspore", "jax", "reference_torch"]
STARTUP_TIMEOUT = 480  # s: four servers start at once on two cores
REQUEST_TIMEOUT = 120
NEAR_TIE = 1e-3
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


def verdict(got: list[int], ref: dict) -> str:
    """"same", "near-tie" (the reference's top-2 gap < NEAR_TIE at the first difference) or
    the difference."""
    want = ref["output_ids"]
    if got == want:
        return "same"
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i >= min(len(got), len(want)):
        return f"length {len(got)} != {len(want)}"
    top = ref["meta_info"]["output_top_logprobs"][i]
    gap = top[0][0] - top[1][0]
    return "near-tie" if gap < NEAR_TIE else f"token {i}: {got[i]} != {want[i]} (top-2 gap {gap:.3g})"


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


class Fleet:
    """The module's servers: `stage(specs)` stops every server not in `specs` and starts the
    missing ones (all at once), so at most four are alive. A spec is (name, backend, role)."""

    def __init__(self, model: str, log_dir):
        self.model, self.log_dir = model, log_dir
        self.servers: dict[str, Server] = {}
        self.bootstrap: dict[str, int] = {}  # prefill server name -> its bootstrap port
        self.ready: set[str] = set()  # servers seen ready (once is enough)

    def stage(self, specs: list[tuple[str, str, str]]) -> dict[str, Server]:
        assert len(specs) <= 4
        wanted = {name for name, _, _ in specs}
        stop_all([s for n, s in self.servers.items() if n not in wanted])
        self.servers = {n: s for n, s in self.servers.items() if n in wanted}
        self.ready &= wanted
        for name, backend, role in specs:
            if name in self.servers:
                continue
            args = ["--model-impl", backend]
            if role in ("prefill", "decode"):
                if role == "prefill":
                    self.bootstrap[name] = free_port()
                    args += ["--enable-metrics"]
                port = self.bootstrap.get(name) or free_port()  # decode: the router gives the prefill's
                args += ["--disaggregation-mode", role, "--disaggregation-bootstrap-port", str(port), "--nccl-port", str(free_port())]
            self.servers[name] = Server(name, self.model, tuple(args), dict(os.environ), self.log_dir)
        t0, fresh = time.monotonic(), [n for n, s in self.servers.items() if s.proc.poll() is None and n not in self.ready]
        for name, _, _ in specs:
            self.servers[name].wait_ready(STARTUP_TIMEOUT)
        self.ready.update(wanted)
        if fresh:
            print(f"\n{', '.join(sorted(fresh))} started and ready in {time.monotonic() - t0:.0f} s")
        return self.servers

    def stop(self) -> None:
        stop_all(list(self.servers.values()))
        self.servers = {}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    missing = [b for b in BACKENDS if b not in installed_backends()]
    if missing:
        pytest.fail(f"backends not installed: {missing} (make setup installs them)")
    for module in ("sglang_router", "mooncake"):
        r = subprocess.run([PYTHON, "-c", f"import {module}; import {module}.{'engine' if module == 'mooncake' else 'launch_router'}"],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, f"PD needs {module} (make setup installs it):\n{r.stderr[-3000:]}"
    from sglang_fx.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("sglang_pd")
    f = Fleet(str(make_tiny_model("qwen3", root / "qwen3")), root)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="module")
def references(fleet):
    """{backend: [each prompt alone on an aggregated server, with top-2 logprobs]}."""
    servers = fleet.stage([(f"agg-{b}", b, "aggregated") for b in BACKENDS])
    return {b: [generate(servers[f"agg-{b}"].url, body(p, return_logprob=True, top_logprobs_num=2)) for p in PROMPTS]
            for b in BACKENDS}  # fmt: skip


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


REQUESTS_PER_CHECK = 2 * len(PROMPTS) + 1
STAGE2 = [(f"{b}-{r}", b, r) for b in ("mindspore", "jax") for r in ("prefill", "decode")]


@pytest.mark.parametrize("prefill_backend, decode_backend",
                         [("mindspore", "mindspore"), ("jax", "jax"), ("mindspore", "jax"), ("jax", "mindspore")])  # fmt: skip
def test_pd_matches_aggregated(fleet, references, prefill_backend, decode_backend):
    servers = fleet.stage(STAGE2)
    prefill, decode = servers[f"{prefill_backend}-prefill"], servers[f"{decode_backend}-decode"]
    name = f"PD {prefill_backend} -> {decode_backend}"
    router = Router(name.replace(" ", "").replace(">", ""), prefill, fleet.bootstrap[prefill.name], decode, fleet.log_dir, mini_lb=True)
    try:
        same = prefill_backend == decode_backend
        refs = [references[decode_backend]] if same else [references[prefill_backend], references[decode_backend]]
        check_pair(name, router, refs, exact=same)
    finally:
        router.stop()
    check_decode_only(prefill, decode, REQUESTS_PER_CHECK)


def test_reference_torch_pair_behind_the_rust_router(fleet, references):
    servers = fleet.stage([("reference_torch-prefill", "reference_torch", "prefill"),
                           ("reference_torch-decode", "reference_torch", "decode")])  # fmt: skip
    prefill, decode = servers["reference_torch-prefill"], servers["reference_torch-decode"]
    router = Router("rust-router", prefill, fleet.bootstrap[prefill.name], decode, fleet.log_dir, mini_lb=False)
    try:
        check_pair("PD reference_torch (Rust router)", router, [references["reference_torch"]], exact=True)
    finally:
        router.stop()
    check_decode_only(prefill, decode, REQUESTS_PER_CHECK)
