"""SGLang's HTTP server (`python -m sglang.launch_server`) on the CPU with --model-impl NAME for
each framework backend (mindspore, jax), checked against SGLang's native Qwen3
(--model-impl sglang) and against transformers.

One module-scoped set of processes, started together so their start-ups overlap:
- a native server and one server per available framework backend on the same tiny float32
  Qwen3 (loopback, free ports); every request goes to native and to the backend under test (the
  `both` fixture's parameter), whose answers must equal the native ones (and whose launcher
  process has not loaded the backend's framework): /generate
  (batched, streamed, with stop strings and stop tokens), /v1/completions,
  /v1/chat/completions (the tiny tokenizer's ChatML template), 8 concurrent requests, and a
  long shared prefix (a radix-cache hit, `cached_tokens` in meta_info);
- launches that must fail at start-up with a clear message and a non-zero exit: an unknown
  --model-impl, a backend whose framework is missing, a backend without the CPU device, an
  architecture a backend does not declare (a tiny DeepSeek-V3 on a Qwen3-only backend),
  draft-model speculative decoding (EAGLE), NGRAM on a backend that declares no verify steps
  (jax), and LoRA, which sglang-fx backends do not run yet.
Every wait is bounded and every process group is terminated at the end.
Budget: about 2.5 minutes on a 2-core machine (start-ups ~1 minute of it).
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")

from sglang_fx.tiny import SAMPLE_PROMPTS  # noqa: E402

from .sglang_support import (  # noqa: E402
    DEVICE_BACKEND,
    UNAVAILABLE_BACKEND,
    Server,
    available,
    entry_points_env,
    installed_backends,
    stop_all,
)

STARTUP_TIMEOUT = 300  # s, for a server to answer /health_generate (two start at once)
FAIL_TIMEOUT = 180  # s, for a launch that must fail to exit
REQUEST_TIMEOUT = 60  # s, per HTTP request

PROMPTS = SAMPLE_PROMPTS
GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}  # full-length outputs to compare
# About 300 tokens shared by two requests; no other request starts with it.
LONG_PREFIX = "Shared context: " + " ".join(f"item{i % 23} value{i % 7}" for i in range(120))

FAILING = {
    # name: (checkpoint, launcher arguments, launcher module, messages the output must contain)
    "unknown_impl": ("qwen3", ("--model-impl", "no_such_backend"), "sglang.launch_server", [
        "--model-impl 'no_such_backend' is neither an SGLang implementation nor an installed sglang-fx backend",
        "mindspore", "reference_torch"]),  # the message lists what is valid
    "framework_missing": ("qwen3", ("--model-impl", "unavailable_test"), "sglang.launch_server", [
        "sglang-fx backend 'unavailable_test' cannot serve this",
        "is unavailable: No module named 'nosuchframework': pip install nosuchframework"]),
    "device_missing": ("qwen3", ("--model-impl", "npu_only_test"), "sglang_fx.sglang.launch_server", [
        "sglang-fx backend 'npu_only_test' cannot serve this",
        "device 'cpu' is not supported; supported devices: npu"]),
    "architecture_unsupported": ("deepseek_v3", ("--model-impl", "qwen3_only_test"), "sglang.launch_server", [
        "sglang-fx backend 'qwen3_only_test' cannot serve this",
        "architecture 'DeepseekV3ForCausalLM' is not supported; supported: "]),
    # Not (yet) run by sglang-fx: refused at start-up instead of dying at the first draft step,
    # the first verify step, or when SGLang's LoRA manager finds no modules to wrap.
    "speculative_draft_model": ("qwen3", ("--model-impl", "reference_torch", "--speculative-algorithm", "EAGLE"),
                                "sglang.launch_server", [
        "sglang-fx backend 'reference_torch' cannot serve this",
        "speculative decoding with --speculative-algorithm EAGLE is not supported by sglang-fx backends yet",
        "supported: NGRAM"]),
    # (NGRAM on a backend without verify steps: every installed backend verifies trees now; the
    # refusal is tested on declared Capabilities in test_sglang_spec.py::test_startup_decision_for_speculative_decoding.)
    "lora": ("qwen3", ("--model-impl", "reference_torch", "--enable-lora", "--max-lora-rank", "8",
                       "--lora-target-modules", "q_proj"), "sglang.launch_server", [
        "sglang-fx backend 'reference_torch' cannot serve this",
        "LoRA adapters (--enable-lora, --lora-paths) are not supported by sglang-fx backends yet"]),
}  # fmt: skip


#: The backends served and compared with native: sglang-fx's framework backends.
BACKENDS = ("mindspore", "jax")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints: "qwen3" (float32, served) and "deepseek_v3" (an architecture the
    qwen3_only_test backend does not declare)."""
    from sglang_fx.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(make_tiny_model(arch, root / arch)) for arch in ("qwen3", "deepseek_v3")}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, models):
    """{name: Server}: "native" and one server per available BACKENDS entry (not yet waited
    for), and the FAILING launches. All are stopped at the end of the module."""
    if "reference_torch" not in installed_backends():
        pytest.skip("the reference_torch backend is not installed")
    root = tmp_path_factory.mktemp("sglang_server")
    eps = root / "entry_points"
    eps.mkdir()
    env = entry_points_env(eps, {
        "npu_only_test": DEVICE_BACKEND.format(name="npu_only_test", devices=("npu",), architectures=None),
        "qwen3_only_test": DEVICE_BACKEND.format(name="qwen3_only_test", devices=("cpu",), architectures=("Qwen3ForCausalLM",)),
        "unavailable_test": UNAVAILABLE_BACKEND.format(name="unavailable_test"),
    })  # fmt: skip
    started: dict[str, Server] = {}
    try:
        for impl in ("sglang", *filter(available, BACKENDS)):
            name = "native" if impl == "sglang" else impl
            started[name] = Server(name, models["qwen3"], ("--model-impl", impl), env, root)
        for name, (arch, args, module, _) in FAILING.items():
            started[name] = Server(name, models[arch], args, env, root, module=module)
        yield started
    finally:
        stop_all(list(started.values()))


@pytest.fixture(scope="module", params=BACKENDS)
def both(servers, request) -> tuple[Server, Server]:
    """(native, the server of the backend named by the parameter), both ready."""
    if request.param not in servers:
        pytest.skip(f"the sglang-fx {request.param} backend is not installed or not available here")
    native, ms = servers["native"], servers[request.param]
    native.wait_ready(STARTUP_TIMEOUT)
    ms.wait_ready(STARTUP_TIMEOUT)
    return native, ms


def post(server: Server, path: str, body: dict) -> dict:
    r = requests.post(server.url + path, json=body, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, (server.name, path, r.status_code, r.text[:2000])
    return r.json()


def on_both(both, path: str, body: dict) -> tuple[dict, dict]:
    native, ms = both
    return post(native, path, body), post(ms, path, body)


def stream(server: Server, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a server-sent-events response, up to `data: [DONE]`."""
    chunks = []
    with requests.post(server.url + path, json={**body, "stream": True}, stream=True, timeout=REQUEST_TIMEOUT) as r:
        assert r.status_code == 200, (server.name, path, r.status_code, r.text[:2000])
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return chunks
            chunks.append(json.loads(data))
    raise AssertionError(f"{server.name}: the stream of {path} ended without [DONE]")


# ------------------------------------------------------------------------------------------
# Each backend's server answers as the native one
# ------------------------------------------------------------------------------------------


def test_server_runs_the_sglang_fx_backend(both):
    native, ms = both
    info = requests.get(ms.url + "/server_info", timeout=REQUEST_TIMEOUT).json()
    assert info["model_impl"] == ms.name, info.get("model_impl")
    assert info["disable_overlap_schedule"] is True  # plugin.synchronous_schedule, on CPU
    log = ms.log.read_text(errors="replace")
    assert f"on backend '{ms.name}' ({ms.name}" in log, ms.output()  # the adapter's load message
    assert "on backend '" not in native.log.read_text(errors="replace")  # native runs SGLang's own Qwen3


#: A path part of each framework backend's shared libraries, as mapped into a process.
FRAMEWORK_LIBRARIES = {"mindspore": "/mindspore/", "jax": "/jaxlib/"}


def test_the_launcher_imports_no_model_framework(both):
    """The HTTP launcher checks the backend in a child process, so the framework is mapped only
    into the scheduler, which runs the model (the check sees it there, so it can fail)."""
    psutil = pytest.importorskip("psutil")
    _, server = both
    marker = FRAMEWORK_LIBRARIES[server.name]
    launcher = psutil.Process(server.proc.pid)

    def maps_framework(proc) -> bool:
        return any(marker in m.path for m in proc.memory_maps(grouped=True))

    assert not maps_framework(launcher), f"the launcher of {server.name} maps {marker} libraries"
    assert any(maps_framework(c) for c in launcher.children(recursive=True)), "no process of the server maps the framework"


def test_generate_batch_matches_native(both):
    want, got = on_both(both, "/generate", {"text": PROMPTS, "sampling_params": GREEDY})
    assert len(got) == len(PROMPTS)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [o["text"] for o in got] == [o["text"] for o in want]
    assert all(len(o["output_ids"]) == GREEDY["max_new_tokens"] or o["meta_info"]["finish_reason"]["type"] == "stop" for o in got)


def test_completions_match_native(both):
    body = {"model": "tiny", "prompt": PROMPTS[:4], "max_tokens": 12, "temperature": 0}
    want, got = on_both(both, "/v1/completions", body)
    texts = lambda r: [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]  # noqa: E731
    assert texts(got) == texts(want) and len(texts(got)) == 4
    assert got["usage"] == want["usage"]


def test_chat_completions_match_native_with_the_chat_template(both, models):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0}
    want, got = on_both(both, "/v1/chat/completions", body)
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["usage"] == want["usage"]
    tok = AutoTokenizer.from_pretrained(models["qwen3"])
    templated = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated  # a BatchEncoding in transformers 5
    assert got["usage"]["prompt_tokens"] == len(templated)  # the ChatML template was applied


def test_concurrent_requests_match_native(both):
    """8 requests in flight at once (SGLang batches them; lengths differ, so they join and
    leave the running batch at different steps)."""

    def run(server):
        with ThreadPoolExecutor(8) as pool:
            bodies = [{"text": p, "sampling_params": {**GREEDY, "max_new_tokens": 8 + 2 * i}} for i, p in enumerate(PROMPTS)]
            return list(pool.map(lambda b: post(server, "/generate", b), bodies))

    native, ms = both
    want, got = run(native), run(ms)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want]
    assert [len(o["output_ids"]) for o in got] == [8 + 2 * i for i in range(8)]


def test_shared_prefix_hits_the_radix_cache(both):
    prefix = f"{both[1].name}. {LONG_PREFIX}"  # new to the native server too, which serves every backend's test
    first = {"text": prefix + " First question: what comes next?", "sampling_params": GREEDY}
    second = {"text": prefix + " Second question: and then?", "sampling_params": GREEDY}
    on_both(both, "/generate", first)
    want, got = on_both(both, "/generate", second)
    assert got["output_ids"] == want["output_ids"]
    cached, prompt = got["meta_info"]["cached_tokens"], got["meta_info"]["prompt_tokens"]
    assert cached == want["meta_info"]["cached_tokens"]
    assert prompt > 250 and cached >= prompt - 20, (cached, prompt)  # all but the new question


def test_streaming_matches_native(both):
    native, ms = both
    body = {"text": PROMPTS[2], "sampling_params": {**GREEDY, "max_new_tokens": 20}}
    whole = post(native, "/generate", body)
    for server in both:
        chunks = stream(server, "/generate", body)
        assert len(chunks) > 1, (server.name, chunks)
        assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"], server.name
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the river."}], "max_tokens": 16, "temperature": 0}
    want = post(native, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    for server in both:
        chunks = stream(server, "/v1/chat/completions", chat)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert text == want, server.name


def test_stop_strings_and_stop_tokens_match_native(both):
    native, _ = both
    free = post(native, "/generate", {"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 32}})
    text = free["text"]
    found = re.search(r"[A-Za-z]{2,}", text[len(text) // 3:])
    assert found, f"no word in the unstopped output to use as a stop string: {text!r}"
    stop = found.group(0)
    body = {"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 32, "stop": [stop]}}
    want, got = on_both(both, "/generate", body)
    assert got["text"] == want["text"] and got["output_ids"] == want["output_ids"]
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    assert got["meta_info"]["finish_reason"]["type"] == "stop" and got["meta_info"]["finish_reason"]["matched"] == stop
    assert text.startswith(got["text"]) and stop not in got["text"]

    # stop_token_ids, like EOS, are not checked under ignore_eos: greedy without it, and an
    # ordinary token (ids 0-2 are the tokenizer's special tokens) that it generates, after the first.
    plain = {"temperature": 0, "max_new_tokens": 32}
    free = post(native, "/generate", {"text": PROMPTS[0], "sampling_params": plain})["output_ids"]
    stop_id = next(t for t in free[1:] if t > 2)
    body = {"text": PROMPTS[0], "sampling_params": {**plain, "stop_token_ids": [stop_id]}}
    want, got = on_both(both, "/generate", body)
    assert got["output_ids"] == want["output_ids"] and got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"]
    assert got["meta_info"]["finish_reason"]["matched"] == stop_id
    assert got["output_ids"] == free[: free.index(stop_id) + 1]


def test_sampled_requests(both):
    """Sampling (temperature > 0) takes SGLang's sampler path, which updates the returned
    logits in place: top_k=1 must still give the greedy tokens; a free sample must finish."""
    top1 = {"text": PROMPTS[:4], "sampling_params": {"temperature": 0.8, "top_k": 1, "max_new_tokens": 12, "ignore_eos": True}}
    want, got = on_both(both, "/generate", top1)
    greedy = post(both[0], "/generate", {"text": PROMPTS[:4], "sampling_params": {**GREEDY, "max_new_tokens": 12}})
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in want] == [o["output_ids"] for o in greedy]
    free = {"text": PROMPTS[0], "sampling_params": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "ignore_eos": True}}
    assert len(post(both[1], "/generate", free)["output_ids"]) == 12
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}  # default sampling
    assert post(both[1], "/v1/chat/completions", chat)["choices"][0]["finish_reason"] in ("length", "stop")


def test_logprobs_match_transformers(both, models):
    """Input-token and output-token logprobs (and their top-5) of the backend's server equal
    those of transformers' float32 model on the same checkpoint within 1e-4; the native
    server's too."""
    import torch
    from transformers import AutoModelForCausalLM

    body = {"text": PROMPTS[4], "sampling_params": {**GREEDY, "max_new_tokens": 8}, "return_logprob": True,
            "logprob_start_len": 0, "top_logprobs_num": 5}  # fmt: skip
    hf = AutoModelForCausalLM.from_pretrained(models["qwen3"], dtype=torch.float32).eval()
    figures = {}
    for server in both:
        meta = post(server, "/generate", body)["meta_info"]
        inputs = [t[1] for t in meta["input_token_logprobs"]]
        outputs = [t[1] for t in meta["output_token_logprobs"]]
        assert len(inputs) == meta["prompt_tokens"] and len(outputs) == 8
        with torch.no_grad():
            logits = hf(torch.tensor([inputs + outputs])).logits[0].float()
        logp = torch.log_softmax(logits, -1)  # row i: the distribution of token i + 1
        n = len(inputs)
        rows = [(i - 1, inputs[i], meta["input_token_logprobs"][i][0], meta["input_top_logprobs"][i]) for i in range(1, n)]
        rows += [(n - 1 + j, outputs[j], meta["output_token_logprobs"][j][0], meta["output_top_logprobs"][j]) for j in range(8)]
        diff = 0.0
        assert meta["input_token_logprobs"][0][0] is None  # nothing predicts the first token
        for row, token, value, top in rows:
            diff = max(diff, abs(value - float(logp[row, token])))
            want_vals, want_ids = torch.topk(logp[row], 5)
            assert [t[1] for t in top] == want_ids.tolist(), (server.name, row)
            diff = max(diff, max(abs(t[0] - float(w)) for t, w in zip(top, want_vals)))
        figures[server.name] = diff
        assert outputs == logp[n - 1:].argmax(-1).tolist()[:8]  # greedy = transformers' argmax
    print("max |logprob - transformers|:", figures)
    assert all(d < 1e-4 for d in figures.values()), figures


MALFORMED = [
    ("/generate", "not json at all"),
    ("/generate", {"text": 5}),
    ("/generate", {"sampling_params": {"max_new_tokens": 4}}),  # no text / input_ids
    ("/generate", {"text": "a", "sampling_params": {"temperature": -1}}),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": -1}}),
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 100000}}),  # past the context length
    ("/generate", {"text": "a", "sampling_params": {"max_new_tokens": 4}, "return_logprob": True, "token_ids_logprob": [10**6]}),
    ("/v1/completions", {"model": "tiny"}),  # no prompt
    ("/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": "many"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": "not a list"}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}),
]  # fmt: skip


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(both):
    native, ms = both
    body = {"text": PROMPTS[1], "sampling_params": GREEDY}
    before = post(ms, "/generate", body)
    codes = []
    for path, bad in MALFORMED:
        kw = {"data": bad, "headers": {"Content-Type": "application/json"}} if isinstance(bad, str) else {"json": bad}
        try:
            codes.append((path, bad, requests.post(ms.url + path, timeout=REQUEST_TIMEOUT, **kw).status_code))
        except requests.RequestException as e:
            codes.append((path, bad, repr(e)))
    assert all(isinstance(code, int) and 400 <= code < 500 for _, _, code in codes), (codes, ms.output())
    assert ms.proc.poll() is None, ms.output()
    assert post(ms, "/generate", body)["output_ids"] == before["output_ids"] == post(native, "/generate", body)["output_ids"]
    assert requests.get(ms.url + "/ready", timeout=REQUEST_TIMEOUT).status_code == 200


# ------------------------------------------------------------------------------------------
# Start-up failures: clear message, non-zero exit, no hang
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(FAILING))
def test_bad_configuration_fails_at_startup(servers, case):
    server = servers[case]
    code = server.wait_exit(FAIL_TIMEOUT)
    out = server.output(20000)
    assert code is not None, f"{case}: the launcher still runs after {FAIL_TIMEOUT}s (a hang):\n{out[-4000:]}"
    assert code != 0, out[-4000:]
    for message in FAILING[case][3]:
        assert message in out, (message, out[-4000:])
    # The message is the error SGLang reports, not a log line buried in a later crash.
    last = [line for line in out.splitlines() if line.strip() and "leaked" not in line and not line.startswith(" - ")]
    assert any("ValueError: --model-impl" in line for line in last[-30:]), out[-4000:]
