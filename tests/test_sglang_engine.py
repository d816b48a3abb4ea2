"""SGLang 0.5.23 end to end on the CPU, through the sglang-fx plugin (`--model-impl NAME`).

Every engine runs in a subprocess (SGLang's Engine spawns processes and needs a real
`__main__`), with SGLANG_USE_CPU_ENGINE=1 set by our launch paths. If the installed sglang-fx
does not declare its `sglang.srt.plugins` entry point yet, the tests declare it themselves in a
temporary dist-info on PYTHONPATH (so SGLang's subprocesses find it too). The same mechanism
registers test-only backends wrapping reference_torch:
- "npu_only_test": declares NPU only, so start-up must fail naming the device;
- "mindspore", only when the real sglang-fx mindspore backend is not installed.
`--model-impl mindspore` (the real backend when it is installed and available here, else the
stand-in) shows that sglang-fx serves that name on a CPU, past SGLang's NPU-only check.
Budget: about 2 minutes on a 2-core machine.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

FAKE_BACKEND = '''
"""Test-only sglang-fx backend: the reference_torch hooks under another name/capabilities."""
import dataclasses
from sglang_fx import hookimpl
from sglang_fx.capabilities import Capabilities
from sglang_fx_reference_torch import plugin as ref

NAME, DEVICES = {name!r}, {devices!r}

@hookimpl
def sglang_fx_backend_info():
    info = ref.sglang_fx_backend_info()
    caps = dataclasses.replace(info.capabilities, dtypes={{d: ref.FLOATS for d in DEVICES}})
    return dataclasses.replace(info, name=NAME, capabilities=caps)

sglang_fx_make_exchange = ref.sglang_fx_make_exchange
sglang_fx_make_kv_cache = ref.sglang_fx_make_kv_cache
sglang_fx_make_attention = ref.sglang_fx_make_attention
sglang_fx_make_runner = ref.sglang_fx_make_runner
'''


def _has_plugin_entry_point() -> bool:
    return any(ep.value.startswith("sglang_fx.sglang.plugin") for ep in md.entry_points(group="sglang.srt.plugins"))


def _installed_backends() -> set[str]:
    return {ep.name for ep in md.entry_points(group="sglang_fx.backends")}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """Environment for SGLang subprocesses: test entry points on PYTHONPATH."""
    if "reference_torch" not in _installed_backends():
        pytest.skip("the reference_torch backend is not installed")
    root = tmp_path_factory.mktemp("sglang_fx_entry_points")
    backends = {"npu_only_test": ("npu",)}
    if "mindspore" not in _installed_backends():
        backends["mindspore"] = ("cpu", "cuda", "npu")
    lines = ["[sglang_fx.backends]"]
    for name, devices in backends.items():
        module = f"sglang_fx_test_backend_{name}"
        (root / f"{module}.py").write_text(FAKE_BACKEND.format(name=name, devices=devices))
        lines.append(f"{name} = {module}")
    if not _has_plugin_entry_point():
        lines += ["[sglang.srt.plugins]", "sglang_fx = sglang_fx.sglang.plugin:register"]
    dist = root / "sglang_fx_test_entry_points-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang-fx-test-entry-points\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(root), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def _mindspore_usable() -> bool:
    """The name "mindspore" is served by sglang-fx here: the test stand-in, or the real
    backend when it is installed and available."""
    if "mindspore" not in _installed_backends():
        return True  # the env fixture registers the stand-in
    from sglang_fx.registry import Registry

    try:
        return Registry().info("mindspore").unavailable is None
    except Exception:
        return False


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from sglang_fx.tiny import make_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "qwen3"
    make_tiny_model("qwen3", str(path))
    return str(path)


def _server(env: dict, model: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Start `python -m sglang_fx.sglang.launch_server` expecting a start-up failure."""
    cmd = [PYTHON, "-m", "sglang_fx.sglang.launch_server", "--model-path", model, "--device", "cpu",
           "--attention-backend", "torch_native", "--dtype", "float32", "--disable-cuda-graph",
           "--max-total-tokens", "4096", "--port", "31977", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_reference_torch_matches_native_greedy(env, model, tmp_path):
    """Native Qwen3 runs; reference_torch and mindspore give the same greedy tokens on a
    batch, on radix-cache hits, across chunked prefill, and the same input logprobs."""
    impls = ["sglang", "reference_torch"]
    if _mindspore_usable():
        impls.append("mindspore")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [PYTHON, str(ROOT / "examples" / "sglang_compare.py"), "--model", model, "--impls", *impls,
         "--repeats", "1", "--out", str(report_path)],
        env=env, capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    log = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert report_path.exists(), log
    report = json.loads(report_path.read_text())
    native = report["results"]["sglang"]
    assert len(native["batch"]) == 8 and all(len(t) == 24 for t in native["batch"])
    assert native["cached_tokens"][0] > 0, ("the shared-prefix prompts should hit the radix cache", log)
    for impl in impls[1:]:
        cmp = report["comparison"][impl]
        assert all(cmp["tokens_identical"].values()), (impl, cmp, log)
        assert cmp["max_abs_input_logprob_diff"] < 1e-4, (impl, cmp, log)
        assert cmp["max_abs_output_logprob_diff"] < 1e-4, (impl, cmp, log)
    print(json.dumps({k: v["timings"] for k, v in report["results"].items()}), json.dumps(report["comparison"]))
    assert report["ok"] and proc.returncode == 0, log


def test_unknown_model_impl_fails_at_startup(env, model):
    proc = _server(env, model, "--model-impl", "no_such_backend")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "--model-impl 'no_such_backend' is neither an SGLang implementation nor an installed sglang-fx backend" in out
    assert "reference_torch" in out  # the message lists what is valid


def test_backend_without_the_device_fails_at_startup(env, model):
    proc = _server(env, model, "--model-impl", "npu_only_test")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "sglang-fx backend 'npu_only_test' cannot serve this" in out
    assert "device 'cpu' is not supported; supported devices: npu" in out
