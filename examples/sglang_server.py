"""SGLang's HTTP server with --model-impl mindspore, and an HTTP client: the way SGLang's
MindSpore users run it, with the model run by the sglang-fx mindspore backend.

    python examples/sglang_server.py                       # tiny checkpoint, CPU: start, query, stop
    python examples/sglang_server.py --model-path /path/to/Qwen3-8B --device npu   # Ascend (see below)
    python examples/sglang_server.py --url http://127.0.0.1:30000   # only the client, against a running server

Starting the server by hand, on the CPU (SGLANG_USE_CPU_ENGINE=1 must be in SGLang's
environment; `python -m sglang_fx.sglang.launch_server` sets it for `--device cpu`):

    SGLANG_USE_CPU_ENGINE=1 python -m sglang.launch_server --model-path /path/to/model \\
        --model-impl mindspore --device cpu --attention-backend torch_native \\
        --dtype float32 --disable-cuda-graph --max-total-tokens 65536 --sleep-on-idle \\
        --host 127.0.0.1 --port 30000

On an Ascend NPU (not run here; the flags of SGLang's MindSpore guide, with SGLang installed
for Ascend, i.e. torch_npu and CANN, plus sglang-fx and its mindspore backend):

    python -m sglang.launch_server --model-path /path/to/Qwen3-8B --model-impl mindspore \\
        --device npu --attention-backend ascend --tp-size 1 --dp-size 1 --host 127.0.0.1 --port 30000

Then any HTTP client:

    curl http://127.0.0.1:30000/generate -H 'Content-Type: application/json' \\
        -d '{"text": "The capital of France is", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}'
    curl http://127.0.0.1:30000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'

The functions below (server_command, start_server, wait_ready, stop_server) are reused by
examples/demo.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

PROMPTS = ["The capital of France is", "Once upon a time there was", "def forward(self, input_ids"]


def server_command(model_path: str, model_impl: str = "mindspore", device: str = "cpu", port: int = 30000) -> list[str]:
    """`python -m sglang.launch_server ...` for a device: the CPU flags sglang-fx is tested with
    (exact float32, SGLang's torch attention, no CUDA graphs, a bounded KV pool, no busy polling
    when idle), or the Ascend
    flags of SGLang's MindSpore guide."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--model-impl", model_impl,
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if device == "cpu":
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
                "--disable-cuda-graph", "--max-total-tokens", "65536", "--sleep-on-idle"]  # fmt: skip
    elif device == "npu":
        cmd += ["--device", "npu", "--attention-backend", "ascend", "--tp-size", "1", "--dp-size", "1"]
    else:
        raise ValueError(f"device {device!r}: this example knows cpu and npu")
    return cmd


def start_server(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the server in its own process group, output to `log`, with this environment plus
    `env`. On the CPU, SGLang needs SGLANG_USE_CPU_ENGINE=1 in its environment before it is
    imported."""
    env = {**os.environ, **(env or {})}
    if "--device" in cmd and cmd[cmd.index("--device") + 1] == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300, log: Path | None = None) -> None:
    """Until the server answers /health_generate (it ran a generation); raises RuntimeError if
    it exits first or after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/health_generate", timeout=10).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f}s" + (f"; see {log}" if log else ""))


def stop_server(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the server's process group (SGLang stops its scheduler and detokenizer too),
    SIGKILL whatever is left after `grace` s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def query(url: str, max_new_tokens: int = 16) -> None:
    """The requests a client sends: SGLang's native /generate (batched, then streamed) and the
    OpenAI-compatible API."""
    greedy = {"temperature": 0, "max_new_tokens": max_new_tokens}
    r = requests.post(url + "/generate", json={"text": PROMPTS, "sampling_params": greedy}, timeout=60)
    r.raise_for_status()
    print("/generate")
    for prompt, out in zip(PROMPTS, r.json()):
        print(f"  {prompt!r} -> {out['text']!r}")

    print("/generate, streamed:", end=" ", flush=True)
    shown = 0
    body = {"text": PROMPTS[0], "sampling_params": greedy, "stream": True}
    with requests.post(url + "/generate", json=body, stream=True, timeout=60) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data:") and line != "data: [DONE]":
                text = json.loads(line[5:])["text"]
                print(repr(text[shown:]), end=" ", flush=True)
                shown = len(text)
    print()

    try:
        import openai
    except ImportError:
        print("(pip install openai for the OpenAI-client part)")
        return
    client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY")
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=max_new_tokens,
    )  # fmt: skip
    print(f"/v1/chat/completions (openai client): {chat.choices[0].message.content!r}")
    completion = client.completions.create(model="default", prompt=PROMPTS[1], temperature=0, max_tokens=max_new_tokens)
    print(f"/v1/completions (openai client): {completion.choices[0].text!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="default: a tiny random Qwen3 made in .cache/demo-qwen3")
    ap.add_argument("--model-impl", default="mindspore")
    ap.add_argument("--device", default="cpu", choices=["cpu", "npu"])
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--url", help="query this running server instead of starting one")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    if args.url:
        query(args.url.rstrip("/"), args.max_new_tokens)
        return 0
    model = args.model_path
    if model is None:
        from sglang_fx.tiny import make_tiny_model

        model = ".cache/demo-qwen3"
        if not Path(model, "config.json").is_file():
            make_tiny_model("qwen3", model, seed=0)
    cmd = server_command(model, args.model_impl, args.device, args.port)
    log = Path(".cache/logs") / f"server-{args.model_impl}.log"
    print("$", " ".join(cmd), f"  (log: {log})", flush=True)
    proc = start_server(cmd, log)
    try:
        url = f"http://127.0.0.1:{args.port}"
        wait_ready(url, proc, log=log)
        query(url, args.max_new_tokens)
    finally:
        stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
