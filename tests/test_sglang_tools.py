"""SGLang's own benchmark tools with sglang-fx backends (--model-impl mindspore), on the CPU, on
a tiny float32 Llama, in short runs; each must print SGLang's table and run our backend:

- latency: `python -m sglang_fx.sglang.bench_one_batch` (SGLang's sglang.benchmark.one_batch
  with the plugins loaded; SGLang's own entry point cannot load them);
- offline throughput: `python -m sglang.benchmark.offline_throughput` (an Engine), with the
  generated-shared-prefix dataset and a local ShareGPT file for its warm-up (no hub);
- serving: `python -m sglang.bench_serving --dataset-name random-ids` against a server started
  with --model-impl mindspore.

HF_HUB_OFFLINE=1 throughout: nothing may come from the hub. Budget: about 3 minutes.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

pytest.importorskip("sglang")

from .sglang_support import PYTHON, ROOT, SERVER_FLAGS, Server  # noqa: E402

TIMEOUT = 420  # s per tool run
LOCAL_SHAREGPT = ROOT / "examples" / "data" / "prompts.sharegpt.json"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """A tiny Llama whose vocabulary (10000) holds the random ids one_batch sends (< 10000)."""
    from sglang_fx.tiny import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("tools") / "llama", vocab_size=10000))


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "SGLANG_USE_CPU_ENGINE": "1", "GLOG_v": "3"}


def run_tool(args: list[str], cwd, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m ARGS` in `cwd` (the tools write their result files there), in a session of
    its own: on a timeout the whole group goes (one_batch's spawned ranks too)."""
    proc = subprocess.Popen([PYTHON, "-m", *args], env=offline_env(), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{args[0]} still running after {TIMEOUT} s:\n{(stdout + stderr)[-6000:]}") from None
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if expect_ok:
        assert out.returncode == 0, (stdout + stderr)[-6000:]
    return out


def tool_output(args: list[str], cwd) -> str:
    out = run_tool(args, cwd)
    return out.stdout + out.stderr


def test_one_batch_latency_with_mindspore(llama, tmp_path):
    out = tool_output(["sglang_fx.sglang.bench_one_batch", "--model-path", llama, "--model-impl", "mindspore", *SERVER_FLAGS,
                    "--batch-size", "1", "4", "--input-len", "16", "--output-len", "8"], tmp_path)  # fmt: skip
    assert "type=SglangFx_mindspore_ForCausalLM" in out, out[-4000:]  # the sglang-fx backend, not SGLang's wrapper
    table = out[out.index("Benchmark ..."):]  # after one_batch's warm-up: one prefill and decode run per batch size
    assert table.count("Decode.  median latency") == 2 and table.count("Prefill. latency") == 2, out[-4000:]
    assert "Decode 4. Batch size: 1," in table and "Decode 4. Batch size: 4," in table, table


def test_one_batch_at_tp_size_2_loads_the_plugins_in_every_rank(llama, tmp_path):
    """one_batch spawns one process per rank; each must run the sglang-fx backend (SGLang's own
    "mindspore" wrapper would fail with NameError: name 'ms' is not defined)."""
    out = tool_output(["sglang_fx.sglang.bench_one_batch", "--model-path", llama, "--model-impl", "mindspore", *SERVER_FLAGS,
                    "--tp-size", "2", "--batch-size", "2", "--input-len", "8", "--output-len", "4"], tmp_path)  # fmt: skip
    assert out.count("type=SglangFx_mindspore_ForCausalLM") == 2, out[-4000:]  # TP0 and TP1
    assert "Decode 2. Batch size: 2," in out[out.index("Benchmark ..."):], out[-4000:]


def test_one_batch_refuses_an_unknown_model_impl(llama, tmp_path):
    out = run_tool(["sglang_fx.sglang.bench_one_batch", "--model-path", llama, "--model-impl", "mindspor", *SERVER_FLAGS,
                    "--batch-size", "1", "--input-len", "8", "--output-len", "2"], tmp_path, expect_ok=False)  # fmt: skip
    assert out.returncode != 0
    assert "--model-impl 'mindspor' is neither an SGLang implementation nor an installed sglang-fx backend" in out.stderr


def test_offline_throughput_with_mindspore(llama, tmp_path):
    out = tool_output(["sglang.benchmark.offline_throughput", "--model-path", llama, "--model-impl", "mindspore", *SERVER_FLAGS,
                    "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "4",
                    "--gsp-system-prompt-len", "64", "--gsp-question-len", "16", "--gsp-output-len", "8",
                    "--dataset-path", str(LOCAL_SHAREGPT)], tmp_path)  # fmt: skip
    assert "Offline Throughput Benchmark Result" in out, out[-4000:]
    assert "Successful requests:                     8" in out, out[-4000:]
    assert "type=SglangFx_mindspore_ForCausalLM" in out, out[-4000:]


def test_bench_serving_against_a_mindspore_server(llama, tmp_path):
    server = Server("tools-mindspore", llama, ("--model-impl", "mindspore"), offline_env(), tmp_path)
    try:
        server.wait_ready(TIMEOUT)
        out = tool_output(["sglang.bench_serving", "--backend", "sglang", "--base-url", server.url, "--dataset-name", "random-ids",
                        "--num-prompts", "8", "--random-input-len", "32", "--random-output-len", "8",
                        "--random-range-ratio", "1"], tmp_path)  # fmt: skip
    finally:
        server.stop()
    assert "Serving Benchmark Result" in out, out[-4000:]
    assert "Successful requests:                     8" in out, out[-4000:]
    assert "Total generated tokens:                  64" in out, out[-4000:]
    assert "on backend 'mindspore'" in server.output(200000)
