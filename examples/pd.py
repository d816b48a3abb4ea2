"""Prefill-decode disaggregation on one CPU machine, against an ordinary (aggregated) server:
starts a prefill server, a decode server and SGLang's router in front of them, plus an
aggregated server, sends the same streamed requests to both layouts, checks the greedy tokens
agree, and prints time to first token and inter-token latency for each.

    python examples/pd.py                                        # tiny Qwen3, mindspore on both sides
    python examples/pd.py --prefill-impl mindspore --decode-impl jax   # two frameworks, one KV layout
    python examples/pd.py --model-path "$(.venv/bin/sglang-fx fetch-model smollm2)" --rust-router

The commands it runs are printed; run them by hand the same way (see README, "PD
disaggregation"). Only SGLang's own PD flags are given: the sglang-fx plugin supplies what a CPU
host needs. On this 2-core machine the figures are indicative only: four processes share the
cores, so PD pays for the transfer and the hand-off without the parallel hardware it is for.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from sglang_server import server_command, start_server, stop_server, wait_ready

from sglang_fx.sglang import OPTIONS_ENV

PROMPTS = ["The capital of France is", "Once upon a time there was", "def forward(self, input_ids",
           "The capital of France is a city where", "In 1969, the first", "Prefill and decode run apart"]  # fmt: skip


def streamed(url: str, prompt: str, max_new_tokens: int) -> tuple[list[int], float, float]:
    """One greedy streamed request: (output ids, time to first token in s, mean inter-token
    latency in s over the tokens after the first)."""
    payload = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
               "stream": True}  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    ids: list[int] = []
    with requests.post(url + "/generate", json=payload, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            now, ids = time.perf_counter(), json.loads(line[5:])["output_ids"]
            first = first if first is not None else now
            last = now
    if first is None or len(ids) < 2:
        raise RuntimeError(f"{url}: the stream returned {len(ids)} tokens")
    return ids, first - t0, (last - first) / (len(ids) - 1)


def start_router(prefill_url: str, bootstrap_port: int, decode_url: str, port: int, rust: bool, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", *([] if rust else ["--mini-lb"]),
           "--prefill", prefill_url, str(bootstrap_port), "--decode", decode_url, "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    print("$", " ".join(cmd), f"  (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    probe = {"text": "Hello", "sampling_params": {"max_new_tokens": 1}}
    while time.monotonic() < deadline:  # until it serves: the Rust router answers 503 until its workers check healthy
        if proc.poll() is not None:
            raise RuntimeError(f"the router exited with status {proc.returncode}; see {log}")
        with contextlib.suppress(requests.RequestException):
            if requests.post(url + "/generate", json=probe, timeout=30).status_code == 200:
                return proc
        time.sleep(1)
    stop_server(proc)
    raise RuntimeError(f"the router was not serving after 120 s; see {log}")


def at_once(url: str, prompts: list[str], max_new_tokens: int) -> list[tuple[list[int], float, float]]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: streamed(url, p, max_new_tokens), prompts))


STAGE_METRIC = re.compile(r'^sglang:per_stage_req_latency_seconds_(sum|count)\{([^}]*)\} (\S+)$', re.M)


def stage_totals(urls: dict[str, str]) -> dict[str, list[float]]:
    """SGLang's per-stage request latencies (`sglang:per_stage_req_latency_seconds`, served by
    a server started with --enable-metrics): {"server/stage": [seconds summed, requests]}."""
    totals: dict[str, list[float]] = {}
    for name, url in urls.items():
        for kind, labels, value in STAGE_METRIC.findall(requests.get(url + "/metrics", timeout=30).text):
            stage = re.search(r'stage="([^"]*)"', labels)
            if stage:
                entry = totals.setdefault(f"{name}/{stage.group(1)}", [0.0, 0.0])
                entry[kind == "count"] += float(value)
    return totals


def measure(name: str, url: str, prompts: list[str], max_new_tokens: int, stages: dict[str, str] | None = None) -> list[list[int]]:
    """Each prompt alone, then all at once (after an unmeasured round at once: backends that
    compile per batch size, mindspore and jax, compile then); prints median TTFT and ITL, and
    with `stages` ({server: url}) the mean time per request of each of SGLang's PD stages in the
    measured round at once."""
    rounds = {"one by one": [streamed(url, p, max_new_tokens) for p in prompts]}
    at_once(url, prompts, max_new_tokens)
    before = stage_totals(stages) if stages else {}
    rounds[f"{len(prompts)} at once"] = at_once(url, prompts, max_new_tokens)
    after = stage_totals(stages) if stages else {}
    for label, results in rounds.items():
        ttft = statistics.median(r[1] for r in results) * 1e3
        itl = statistics.median(r[2] for r in results) * 1e3
        print(f"  {name:<11} {label:<11} time to first token {ttft:7.1f} ms   inter-token latency {itl:6.2f} ms")
    for stage, (seconds, count) in after.items():
        seconds, count = seconds - before.get(stage, [0.0, 0.0])[0], count - before.get(stage, [0.0, 0.0])[1]
        if count:
            print(f"      {stage:<40} {seconds / count * 1e3:8.1f} ms per request ({count:.0f} requests, at once)")
    return [r[0] for r in rounds["one by one"]] + [r[0] for r in rounds[f"{len(prompts)} at once"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="default: a tiny random Qwen3 made in .cache/demo-qwen3")
    ap.add_argument("--prefill-impl", default="mindspore")
    ap.add_argument("--decode-impl", default="mindspore")
    ap.add_argument("--aggregated-impl", help="the aggregated server's --model-impl (default: --decode-impl)")
    ap.add_argument("--rust-router", action="store_true", help="SGLang's Rust router instead of its --mini-lb")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args()
    from sglang_fx.distributed import free_ports

    model = args.model_path
    if model is None:
        from sglang_fx.tiny import make_tiny_model

        model = ".cache/demo-qwen3"
        if not Path(model, "config.json").is_file():
            make_tiny_model("qwen3", model, seed=0)
    logs = Path(".cache/logs")
    logs.mkdir(parents=True, exist_ok=True)
    p_port, d_port, a_port, r_port, bootstrap, nccl_p, nccl_d = free_ports(7)
    commands = {
        "prefill": server_command(model, args.prefill_impl, "cpu", p_port)
        + ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bootstrap), "--nccl-port", str(nccl_p), "--enable-metrics"],
        "decode": server_command(model, args.decode_impl, "cpu", d_port)
        + ["--disaggregation-mode", "decode", "--disaggregation-bootstrap-port", str(bootstrap), "--nccl-port", str(nccl_d), "--enable-metrics"],
        "aggregated": server_command(model, args.aggregated_impl or args.decode_impl, "cpu", a_port),
    }
    procs: dict[str, subprocess.Popen] = {}
    # mindspore and jax compile a decode graph per batch-size bucket (1, 2, 4, 8, ...) on first
    # use: seconds for a real model, paid in time to first token by whichever layout first meets
    # a bucket in a measured round (how requests group into batches differs from round to round,
    # and more so in PD, where they reach decode as their KV arrives). The decode and aggregated
    # servers compile the buckets these rounds use at start-up (the backends' `precompile`
    # option), unless SGLANG_FX_OPTIONS is set; the prefill server never decodes.
    buckets = "1,2,4,8"  # batches of 1 to 6 requests
    options = {} if OPTIONS_ENV in os.environ else {OPTIONS_ENV: json.dumps({b: {"precompile": buckets} for b in ("mindspore", "jax")})}
    try:
        t0 = time.monotonic()
        for name, cmd in commands.items():
            env = options if name != "prefill" else {}
            print("$", *(f"{k}='{v}'" for k, v in env.items()), " ".join(cmd), f"  (log: {logs / name}.log)", flush=True)
            procs[name] = start_server(cmd, logs / f"{name}.log", env)
        urls = {"prefill": f"http://127.0.0.1:{p_port}", "decode": f"http://127.0.0.1:{d_port}", "aggregated": f"http://127.0.0.1:{a_port}"}
        for name, proc in procs.items():
            wait_ready(urls[name], proc, timeout=600, log=logs / f"{name}.log")
        print(f"three servers ready in {time.monotonic() - t0:.0f} s", flush=True)
        procs["router"] = start_router(urls["prefill"], bootstrap, urls["decode"], r_port, args.rust_router, logs / "router.log")
        router = f"http://127.0.0.1:{r_port}"
        streamed(router, PROMPTS[0], 2), streamed(urls["aggregated"], PROMPTS[0], 2)  # warm both layouts up
        print(f"\n{len(PROMPTS)} streamed greedy requests of {args.max_new_tokens} tokens each, median per round:")
        pd_ids = measure(f"PD ({args.prefill_impl}->{args.decode_impl})", router, PROMPTS, args.max_new_tokens,
                         stages={"prefill": urls["prefill"], "decode": urls["decode"]})
        agg_ids = measure("aggregated", urls["aggregated"], PROMPTS, args.max_new_tokens)
        same = sum(a == b for a, b in zip(pd_ids, agg_ids))
        print(f"\ngreedy outputs identical to the aggregated server: {same} of {len(pd_ids)}")
        return 0 if same == len(pd_ids) or args.prefill_impl != args.decode_impl else 1
    finally:
        for name in ("router", "decode", "prefill", "aggregated"):
            if name in procs:
                stop_server(procs[name])


if __name__ == "__main__":
    sys.exit(main())
