"""What `make demo` runs: prompts in, text out, through sglang-fx backends, on a tiny checkpoint.

1. Every installed backend standalone (no SGLang), against Hugging Face transformers, while
   two SGLang servers start in the background (about 30 s):
2. SGLang's HTTP server with --model-impl mindspore (the sglang-fx MindSpore backend) next to
   SGLang's own Qwen3 (--model-impl sglang), both on the CPU: the same requests to both
   (/generate, /v1/chat/completions), outputs side by side.

The checkpoint is a tiny random-weight Qwen3 made locally (no downloads), so the text is
gibberish; identical gibberish is the point.

    python examples/demo.py [--model-path DIR] [--max-new-tokens N] [--no-sglang]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log: errors only (here and in the servers)

import requests  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from sglang_fx.generate import Session  # noqa: E402
from sglang_fx.registry import default_registry  # noqa: E402
from sglang_fx.tiny import make_tiny_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_server import server_command, start_server, stop_server, wait_ready  # noqa: E402

PROMPTS = ["The quick brown fox", "Once upon a time there was", "def forward(self, input_ids"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standalone(model_path: Path, max_new_tokens: int) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(model_path)
    prompts = [tok.encode(p) for p in PROMPTS]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    truth = [hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)[0, len(p):].tolist() for p in prompts]
    print("\n#### 1. sglang-fx backends standalone (sglang_fx.generate.Session) vs transformers")
    reg = default_registry()
    for name in reg.names():
        info = reg.info(name)
        if info.unavailable:
            print(f"\n== {name}: unavailable: {info.unavailable}")
            continue
        start = time.perf_counter()
        session = Session(name, model_path, dtype="float32", page_size=16)
        loaded = time.perf_counter()
        outs = session.generate(prompts, max_new_tokens)
        done = time.perf_counter()
        print(f"\n== {name} ({info.framework} {info.framework_version}): load {loaded - start:.2f}s, "
              f"generate {len(prompts)}x{max_new_tokens} tokens {done - loaded:.2f}s")  # fmt: skip
        for text, out, want in zip(PROMPTS, outs, truth):
            verdict = "same as transformers" if out == want else "DIFFERS from transformers"
            print(f"  {text!r} -> {tok.decode(out)!r}  [{verdict}]")


def sglang_side_by_side(servers: dict, max_new_tokens: int) -> bool:
    """Send the same requests to every server; print mindspore's answers next to native's."""
    greedy = {"temperature": 0, "max_new_tokens": max_new_tokens}
    answers = {}
    for impl, (url, proc, log) in servers.items():
        wait_ready(url, proc, timeout=300, log=log)
        gen = requests.post(url + "/generate", json={"text": PROMPTS, "sampling_params": greedy}, timeout=120)
        chat = requests.post(url + "/v1/chat/completions", json={"model": "default", "messages": CHAT, "temperature": 0,
                                                                 "max_tokens": max_new_tokens}, timeout=120)  # fmt: skip
        gen.raise_for_status(), chat.raise_for_status()
        answers[impl] = [(o["text"], o["output_ids"]) for o in gen.json()]
        answers[impl].append((chat.json()["choices"][0]["message"]["content"], None))
    ms, native = answers["mindspore"], answers["sglang"]
    print("\n#### 2. SGLang server: --model-impl mindspore (sglang-fx) vs --model-impl sglang (native Qwen3)")
    labels = [f"/generate {p!r}" for p in PROMPTS] + [f"/v1/chat/completions {CHAT[0]['content']!r}"]
    same_all = True
    for label, (m_text, m_ids), (n_text, n_ids) in zip(labels, ms, native):
        same = m_text == n_text and m_ids == n_ids
        same_all &= same
        print(f"  {label}\n    mindspore: {m_text!r}\n    native:    {n_text!r}  [{'same' if same else 'DIFFERENT'}]")
    return same_all


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, default=Path(".cache/demo-qwen3"))
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--no-sglang", action="store_true", help="only the standalone part")
    args = ap.parse_args()
    if not (args.model_path / "config.json").is_file():
        make_tiny_model("qwen3", args.model_path, seed=0)
        print(f"made a tiny Qwen3 checkpoint in {args.model_path}")

    servers = {}
    use_sglang = not args.no_sglang and _sglang_installed()
    try:
        if use_sglang:
            for impl in ("mindspore", "sglang"):
                port = free_port()
                cmd = server_command(str(args.model_path), impl, "cpu", port)
                log = Path(".cache/logs") / f"demo-server-{impl}.log"
                print(f"starting: SGLANG_USE_CPU_ENGINE=1 python -m sglang.launch_server {' '.join(cmd[3:])}  (log: {log})")
                servers[impl] = (f"http://127.0.0.1:{port}", start_server(cmd, log), log)
        standalone(args.model_path, args.max_new_tokens)
        ok = sglang_side_by_side(servers, args.max_new_tokens) if servers else True
    finally:
        for _, proc, _ in servers.values():
            stop_server(proc)
    if use_sglang:
        print("\nSGLang with --model-impl mindspore gave the same tokens as SGLang's native Qwen3" if ok
              else "\nSGLang with --model-impl mindspore DIFFERED from SGLang's native Qwen3")  # fmt: skip
    return 0 if ok else 1


def _sglang_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


if __name__ == "__main__":
    sys.exit(main())
