"""SGLang 0.5.23's own parallel layouts on the CPU with sglang-fx backends: tensor parallelism
(`tp_size=2`), experts split over the TP group (`ep_size=2`), data-parallel replicas
(`--dp-size 2`, each a tensor-parallel world of its own) and two "nodes" (`--nnodes 2`), with
real collectives across real scheduler processes: SGLang's gloo for its own traffic, MindSpore's
mccl inside the mindspore backend's graphs, XLA's gloo collectives inside the jax backend's
programs, torch.distributed for reference_torch.

- Engines (`examples/sglang_compare.py`): Qwen3 at tp=2 through native SGLang, reference_torch,
  mindspore and jax: token-identical, input logprobs within 1e-4 of transformers. Qwen3-MoE at
  tp=2, ep=2 through reference_torch, mindspore and jax (SGLang's native MoE fails at ep=2 on CPU:
  "index -1 is out of bounds", its EP dispatcher marks other ranks' experts -1), compared with
  each other and with transformers. A W8A8 Qwen3 (`sglang-fx quantize`) at tp=2 through
  mindspore and jax, against reference_torch (standalone Sessions) at tp=2 and at tp=1.
- Servers: mindspore at --tp-size 2 --dp-size 2 (four schedulers, two MindSpore worlds): both
  replicas serve (meta_info.dp_rank), answers equal a tp=1 server's. Two launches with
  --nnodes 2 --node-rank 0/1 --tp-size 2 serve over HTTP. A model whose heads tp_size does not
  divide, and an unknown backend option in SGLANG_FX_OPTIONS, fail at start-up with the numbers
  and the names. Killing one scheduler mid-request ends the whole server within 90 s (about
  15 s measured), nothing left running.
The engine comparisons run first, before the servers start, so that no server's start-up or
idle loop slows them. Budget: about 6 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

pytest.importorskip("sglang")
requests = pytest.importorskip("requests")
psutil = pytest.importorskip("psutil")

from .sglang_support import (  # noqa: E402
    PYTHON, ROOT, Server, available, entry_points_env, flip_verdict, free_port, leading_agreement, logprob_spread, rank_answers,
    session_answers, stop_all)  # fmt: skip

STARTUP_TIMEOUT = 420  # s; several multi-process servers start at once on 2 cores
REQUEST_TIMEOUT = 120
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = ["hello world", "the quick brown fox", "numbers 1 2 3", "what is the answer", "a b c", "x y"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    if not (available("reference_torch") and available("mindspore")):
        pytest.skip("the reference_torch and mindspore backends are needed")
    return entry_points_env(tmp_path_factory.mktemp("entry_points"), {})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    from sglang_fx.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {
        "qwen3": str(make_tiny_model("qwen3", root / "qwen3")),
        "qwen3_moe": str(make_tiny_model("qwen3_moe", root / "qwen3_moe")),
        # 6 heads, 3 KV heads: tp_size 4 divides neither -> a start-up error naming both
        "six_heads": str(make_tiny_model("qwen3", root / "six_heads", num_attention_heads=6, num_key_value_heads=3)),
    }


# ------------------------------------------------------------------------------------------
# Engines: tokens and logprobs
# ------------------------------------------------------------------------------------------


def compare(env: dict, model: str, impls: list[str], tp: int, ep: int, tmp_path) -> dict:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [PYTHON, str(ROOT / "examples" / "sglang_compare.py"), "--model", model, "--impls", *impls, "--repeats", "1",
         "--tp-size", str(tp), "--ep-size", str(ep), "--hf", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    log = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert out.exists(), log
    report = json.loads(out.read_text())
    print(json.dumps(report["comparison"]), json.dumps(report["vs_transformers"]))
    for impl in impls[1:]:
        cmp = report["comparison"][impl]
        assert all(cmp["tokens_identical"].values()), (impl, cmp, log)
        assert cmp["max_abs_output_logprob_diff"] < 1e-4, (impl, cmp, log)
    assert all(d < 1e-4 for d in report["vs_transformers"].values()), (report["vs_transformers"], log)
    assert report["ok"] and proc.returncode == 0, log
    return report


def _with_jax(impls: list[str]) -> list[str]:
    return [*impls, "jax"] if available("jax") else impls


def test_engine_tp2_backends_match_native(env, models, tmp_path):
    report = compare(env, models["qwen3"], _with_jax(["sglang", "reference_torch", "mindspore"]), 2, 1, tmp_path)
    assert all(len(t) == 24 for t in report["results"]["sglang"]["batch"])


#: tp=2 W8A8 against tp=1 on the tiny Qwen3: largest logprob difference where the greedy tokens still
#: agree. Conformance w8a8/logits_vs_tp1 bounds the logits at twice W8A8's own move from float
#: (0.449 for this model; measured 0.148); through SGLang measured 0.057.
TP1_SPREAD_LIMIT = 0.45


def test_engine_tp2_w8a8_backends_match_reference_torch(env, models, tmp_path):
    """The tiny Qwen3 in W8A8 (`sglang-fx quantize`) through sglang.Engine at tp=2, greedy answers
    (24 tokens) to the 8 sample prompts in one batch: mindspore and jax against reference_torch
    sharded alike, and against reference_torch at tp=1 on the same checkpoint. reference_torch
    runs as standalone Sessions (at tp=2 on two processes of `sglang_fx.distributed`, whose ranks
    must answer alike), which answer as its engine does (at tp=1:
    test_sglang_engine.py::test_engine_serves_a_w8a8_checkpoint_at_float32; at tp=2 measured: the
    same tokens as its tp=2 engine, logprobs within 5e-7).

    - tp=2 backends vs reference_torch tp=2: the same integer math, so the same tokens, except
      where float rounding flips an activation across an int8 rounding edge (measured: one
      near-tie in 8x24 tokens, mindspore's token 15 of one prompt; logprob spread where the tokens
      agree 0.032 for mindspore, 0.013 for jax).
      A flip moves logits by at most the conformance suite's W8A8_TOLERANCE (logprobs by twice
      that), so the first difference must be a near-tie within 2x that (flip_verdict); anything
      else fails, and so does a logprob spread above 2x it where the tokens agree.
    - vs reference_torch tp=1: not the same W8A8 rounding (a row-parallel layer's input, o_proj and
      down_proj, is quantized per token on each rank's slice with the slice's own absmax, a finer
      grid), so tokens may part after a while (measured: 2 to 24 leading tokens in common, the
      same for all three backends; conformance: 66% the same). Required: the first
      token of every answer equal, and the logprob spread below TP1_SPREAD_LIMIT; leading tokens in
      common are printed."""
    import transformers

    from sglang_fx.conformance.cases import W8A8_TOLERANCE
    from sglang_fx.distributed import run_parallel
    from sglang_fx.generate import Session
    from sglang_fx.quantize import quantize
    from sglang_fx.tiny import SAMPLE_PROMPTS

    model = quantize(models["qwen3"], tmp_path / "qwen3-w8a8")
    impls = _with_jax(["mindspore"])
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [PYTHON, str(ROOT / "examples" / "sglang_compare.py"), "--model", str(model), "--impls", *impls, "--tp-size", "2",
         "--answers", "24", *[a for p in SAMPLE_PROMPTS for a in ("--prompt", p)], "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    log = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert out.exists() and proc.returncode == 0, log
    report = json.loads(out.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = [tok(p).input_ids for p in SAMPLE_PROMPTS]
    ranks = run_parallel(rank_answers, 2, args=("reference_torch", str(model), ids, 24))
    assert [a["output_ids"] for a in ranks[0]] == [a["output_ids"] for a in ranks[1]], "the two ranks answer differently"
    base = ranks[0]
    single = session_answers(Session("reference_torch", model, dtype="float32", page_size=1, max_total_tokens=2048), ids, 24)
    problems = []
    for impl, got in [("reference_torch", base)] + [(impl, report["results"][impl]["answers"]) for impl in impls]:
        spread, spread1 = logprob_spread(got, base), logprob_spread(got, single)
        kinds = [flip_verdict(g, r, max(spread, W8A8_TOLERANCE)) for g, r in zip(got, base)]
        lead1 = [leading_agreement(g["output_ids"], s["output_ids"]) for g, s in zip(got, single)]
        print(f"W8A8 tp=2 {impl}: vs reference_torch tp=2 {[k for k, _ in kinds]} (spread {spread:.2g}); "
              f"vs reference_torch tp=1 leading tokens {lead1} of 24 (spread {spread1:.2g})")  # fmt: skip
        problems += [(impl, "tp=2", v) for k, v in kinds if k == "other"]
        if spread > 2 * W8A8_TOLERANCE or spread1 > TP1_SPREAD_LIMIT or min(lead1) < 1:
            problems.append((impl, spread, spread1, lead1))
    assert not problems, (problems, log)


def test_engine_moe_with_experts_split_over_two_ranks(env, models, tmp_path):
    compare(env, models["qwen3_moe"], _with_jax(["reference_torch", "mindspore"]), 2, 2, tmp_path)


# ------------------------------------------------------------------------------------------
# Servers, started together so their start-ups overlap
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(env, models, tmp_path_factory):
    root = tmp_path_factory.mktemp("servers")
    dist_port = free_port()
    node0 = Server("node0", models["qwen3"], ("--model-impl", "mindspore", "--tp-size", "2", "--nnodes", "2", "--node-rank", "0",
                                              "--dist-init-addr", f"127.0.0.1:{dist_port}"), env, root)  # fmt: skip
    node1 = Server("node1", models["qwen3"], ("--model-impl", "mindspore", "--tp-size", "2", "--nnodes", "2", "--node-rank", "1",
                                              "--dist-init-addr", f"127.0.0.1:{dist_port}"), env, root)  # fmt: skip
    started = {
        "tp1": Server("tp1", models["qwen3"], ("--model-impl", "mindspore"), env, root),
        "dp2": Server("dp2", models["qwen3"], ("--model-impl", "mindspore", "--tp-size", "2", "--dp-size", "2"), env, root),
        "node0": node0,
        "node1": node1,
        "heads": Server("heads", models["six_heads"], ("--model-impl", "mindspore", "--tp-size", "4"), env, root),
        "options": Server("options", models["qwen3"], ("--model-impl", "mindspore"),
                          {**env, "SGLANG_FX_OPTIONS": '{"mindspore": {"decode_batch": "1,2"}}'}, root),
    }
    try:
        yield started
    finally:
        stop_all(list(started.values()))


def generate(server: Server, text, **extra) -> dict | list:
    r = requests.post(server.url + "/generate", json={"text": text, "sampling_params": GREEDY, **extra}, timeout=REQUEST_TIMEOUT)
    assert r.status_code == 200, (server.name, r.status_code, r.text[:2000])
    return r.json()


def test_data_parallel_replicas_both_serve_and_answer_as_one_process(servers):
    """--tp-size 2 --dp-size 2: two replicas, each a tensor-parallel MindSpore world of its own
    (two schedulers, one mccl rendezvous each). Requests go round robin; each replica's answers
    equal those of a single-process server."""
    single, dp = servers["tp1"], servers["dp2"]
    single.wait_ready(STARTUP_TIMEOUT)
    dp.wait_ready(STARTUP_TIMEOUT)
    expected = [o["output_ids"] for o in generate(single, PROMPTS)]
    answers = [generate(dp, p) for p in PROMPTS]
    assert [a["output_ids"] for a in answers] == expected
    assert {a["meta_info"]["dp_rank"] for a in answers} == {0, 1}, [a["meta_info"] for a in answers]
    forced = generate(dp, PROMPTS[0], routed_dp_rank=1)
    assert forced["meta_info"]["dp_rank"] == 1 and forced["output_ids"] == expected[0]
    log = dp.output(10**6)
    assert "tp 1/2 (tp:0), ep 0/1, dp 1/2" in log and "tp 0/2 (tp:0), ep 0/1, dp 0/2" in log, log[-3000:]


def test_two_nodes_serve_over_http(servers):
    """Two launches, --nnodes 2 --node-rank 0/1 --tp-size 2: one TP rank each, the MindSpore
    world meeting at the --dist-init-addr host. Node 0 serves HTTP; node 1 answers health only."""
    node0, node1 = servers["node0"], servers["node1"]
    node0.wait_ready(STARTUP_TIMEOUT)
    single = servers["tp1"]
    single.wait_ready(STARTUP_TIMEOUT)
    assert [o["output_ids"] for o in generate(node0, PROMPTS)] == [o["output_ids"] for o in generate(single, PROMPTS)]
    assert node1.proc.poll() is None, node1.output()
    assert requests.get(node1.url + "/health", timeout=REQUEST_TIMEOUT).status_code == 200


def failed_startup(server: Server) -> str:
    """The output of a launch that must exit non-zero at start-up (bounded wait, no hang)."""
    code = server.wait_exit(240)
    out = server.output(20000)
    assert code not in (None, 0), out[-4000:]
    return out


def test_heads_that_tp_size_does_not_divide_fail_at_startup(servers):
    out = failed_startup(servers["heads"])
    assert "tp_size 4 does not divide the 6 attention heads of Qwen3ForCausalLM; use a tp_size among 1, 2, 3, 6" in out, out[-4000:]
    assert "tp_size 4 neither divides nor is a multiple of the 3 KV heads" in out, out[-4000:]


def test_an_unknown_backend_option_fails_at_startup(servers):
    """SGLANG_FX_OPTIONS is checked in the launcher against the options the backend declares."""
    out = failed_startup(servers["options"])
    line = next((line for line in out.splitlines() if "unknown backend option(s) decode_batch; the options it takes: " in line), "")
    taken = line.split("the options it takes: ", 1)[-1].split(", ")
    assert {"mode", "decode_batches", "precompile", "compile_cache"} <= set(taken), out[-4000:]


def test_a_dying_scheduler_ends_the_server(servers):
    """kill -9 of TP rank 1 of the DP replica that serves a streaming request, mid-stream: its
    peer's next collective fails (MindSpore's mccl gives up on a dead peer after about 30 s,
    SGLang's gloo at once), SGLang's watchdog ends the process tree, the request ends (an error
    or a cut stream, not a hang), and no process of the server is left within 90 s. Runs last:
    it takes the dp2 server down. (A rank of an idle replica is noticed only when that replica
    next gets work: with --sleep-on-idle its peer does not poll.)"""
    dp = servers["dp2"]
    dp.wait_ready(STARTUP_TIMEOUT)
    launcher = psutil.Process(dp.proc.pid)
    tree = [launcher, *launcher.children(recursive=True)]
    victims = [p for p in tree if "sglang::scheduler_DP0_TP1" in _cmdline(p)]  # SGLang's process title
    assert len(victims) == 1, [(p.pid, _cmdline(p)) for p in tree]
    outcome: dict = {}

    def long_request():
        try:
            body = {"text": PROMPTS[0], "sampling_params": {**GREEDY, "max_new_tokens": 2000}, "stream": True,
                    "routed_dp_rank": 0}  # fmt: skip
            with requests.post(dp.url + "/generate", json=body, stream=True, timeout=90) as r:
                outcome["chunks"] = sum(1 for _ in r.iter_lines())
        except requests.RequestException as e:
            outcome["error"] = repr(e)

    client = threading.Thread(target=long_request)
    client.start()
    time.sleep(3)
    victims[0].kill()
    start = time.monotonic()
    code = dp.wait_exit(90)
    client.join(timeout=60)
    assert code is not None, f"the server still runs 90 s after a scheduler died:\n{dp.output()}"
    assert not client.is_alive() and outcome, "the client's request hangs"
    gone, alive = psutil.wait_procs(tree, timeout=max(1.0, 90 - (time.monotonic() - start)))
    assert not alive, [(p.pid, _cmdline(p)) for p in alive]


def _cmdline(p) -> str:
    try:
        return " ".join([p.name(), *p.cmdline()])
    except psutil.Error:
        return ""


