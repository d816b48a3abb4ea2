"""Time to first token right after start-up: an SGLang server with --model-impl mindspore, with
and without the backend's `precompile` and `compile_cache` options, on the real
SmolLM2-135M-Instruct.

    python benchmarks/warmup.py [--precompile 1,2,4,8] [--model DIR]

Four servers, one after the other: compiling on first use; precompiling; precompiling with
`compile_cache` into an empty directory (cold); and the same again (warm: the graphs load from
the cache). For each: the start-up time (launch to /health_generate answering), then, in this
order, the time to the first and to the 16th token of one streamed request, of 4 concurrent
ones (the slowest), of 8 concurrent ones, and of one request again once every size has run.
Without precompiling, the first decode at each new batch size compiles its graph inside the
request; with it, those graphs were compiled during start-up (SGLang's warm-up request), one
log line each. Compare the columns of one run.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from sglang_server import server_command, start_server, stop_server, wait_ready  # noqa: E402

from sglang_fx.distributed import free_ports  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Write a haiku about rain.", "What does a CPU do?", "Give a synonym for happy.",
             "How many legs does a spider have?", "What is the boiling point of water?"]  # fmt: skip


def ttft(url: str, question: str) -> tuple[float, float]:
    """Seconds from sending a streamed greedy request (16 tokens) to its first generated token,
    and to its last."""
    body = {"text": question, "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}, "stream": True}
    start = time.perf_counter()
    with requests.post(url + "/generate", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data:") and line.strip() != "data: [DONE]" and json.loads(line[5:])["meta_info"]["completion_tokens"]:
                first = time.perf_counter() - start
                for _ in r.iter_lines():  # read the rest: the request completes
                    pass
                return first, time.perf_counter() - start
    raise RuntimeError("the stream ended without a token")


def concurrent_ttft(url: str, n: int) -> tuple[float, float]:
    """The slowest of n concurrent requests: (first token, last token) seconds."""
    with ThreadPoolExecutor(n) as pool:
        times = list(pool.map(lambda q: ttft(url, q), QUESTIONS[:n]))
    return max(t[0] for t in times), max(t[1] for t in times)


def run(model: str, precompile: str | None, cache: str | None = None, name: str = "none") -> dict:
    port = free_ports(1)[0]
    cmd = server_command(model, "mindspore", "cpu", port)
    env = {}
    if precompile:
        options = {"precompile": precompile, **({"compile_cache": cache} if cache else {})}
        env["SGLANG_FX_OPTIONS"] = json.dumps({"mindspore": options})
    log = Path(".cache/logs") / f"warmup-{name}.log"
    start = time.perf_counter()
    proc = start_server(cmd, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=900, log=log)
        out = {"startup": time.perf_counter() - start}
        out["1"] = ttft(url, QUESTIONS[0])
        out["4"] = concurrent_ttft(url, 4)
        out["8"] = concurrent_ttft(url, 8)
        out["again"] = ttft(url, QUESTIONS[1])
        out["compiled"] = [line.split("sglang-fx mindspore: ")[1].strip() for line in log.read_text().splitlines()
                           if "graph compiled in" in line]  # fmt: skip
        return out
    finally:
        stop_server(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precompile", default="1,2,4,8", help="the option's value for the second server (default 1,2,4,8)")
    ap.add_argument("--model", help="HF checkpoint directory (default: SmolLM2-135M-Instruct via fetch-model)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` still stops the server (finally in run)
    if args.model is None:
        from sglang_fx.models import fetch

        args.model = str(fetch("smollm2"))
    with tempfile.TemporaryDirectory() as cache:
        rows = {
            "compile on first use": run(args.model, None),
            f"precompile={args.precompile}": run(args.model, args.precompile, name="precompile"),
            "+ compile_cache, cold": run(args.model, args.precompile, cache, name="cache-cold"),
            "+ compile_cache, warm": run(args.model, args.precompile, cache, name="cache-warm"),
        }
    print(f"\nmodel: {args.model}; SGLang server, --model-impl mindspore, CPU; seconds")
    phases = (("1", "1st request"), ("4", "then 4 at once"), ("8", "then 8 at once"), ("again", "then 1 again"))
    head = f"{'setting':<24}{'start-up':>10}" + "".join(f"{label:>20}" for _, label in phases)
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        print(f"{name:<24}{r['startup']:>10.1f}" + "".join(f"{f'{r[k][0]:.2f} / {r[k][1]:.2f}':>20}" for k, _ in phases))
    print("each phase: time to the first token / to the 16th (the slowest request of the phase)")
    for name, r in rows.items():
        print(f"{name}: compiled at start-up: {'; '.join(r['compiled']) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
