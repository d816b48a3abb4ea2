"""The sglang-fx command, and the conformance runner's verdicts (known gaps, failures)."""

from __future__ import annotations

import json

import pytest

import sglang_fx.registry as registry_module
from sglang_fx.cli import main
from sglang_fx.conformance.runner import run

from .test_registry import DELEGATING, UNAVAILABLE

# A backend whose exchange always copies: its zero-copy cases must fail.
COPYING = DELEGATING + """
from sglang_fx.exchange import export_torch

class CopyingExchange:
    def from_torch(self, t, *, copy=None):
        return export_torch(t, True)
    def to_torch(self, x, *, copy=None):
        return export_torch(x, True)

@hookimpl
def sglang_fx_make_exchange(device):
    return CopyingExchange()
"""


@pytest.fixture
def installed(fake_registry, monkeypatch):
    """installed({dist: {name: source}}): make these the process's installed backends."""

    def make(dists):
        reg = fake_registry(dists)
        monkeypatch.setattr(registry_module, "_default", reg)
        return reg

    return make


def test_backends_lists_available_and_unavailable(installed, capsys):
    installed({"dist-ref": {"ref": DELEGATING.format(name="ref", gaps={})}, "dist-ghost": {"ghost": UNAVAILABLE}})
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "ref\n  distribution: dist-ref\n  framework: torch" in out
    assert "status: available\n  capabilities: devices/dtypes [cpu: bfloat16, float16, float32" in out
    assert "ghost\n  distribution: dist-ghost\n  framework: framework_that_is_not_installed (not installed)" in out
    assert "status: unavailable: framework_that_is_not_installed is not installed: pip install it" in out


def test_conformance_json_report(installed, tmp_path, capsys):
    installed({"dist-ref": {"ref": DELEGATING.format(name="ref", gaps={})}})
    report = tmp_path / "report.json"
    assert main(["conformance", "--backend", "ref", "--only", "exchange/float32", "--only", "kv_cache/page16", "-q", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["backend"] == "ref" and data["passed"] is True
    assert [c["name"] for c in data["cases"]] == ["exchange/float32/contiguous", "exchange/float32/strided", "kv_cache/page16"]
    assert {"name", "passed", "max_abs_diff", "token_agreement"} <= data["cases"][0].keys()
    assert "ref: 3 passed, 0 failed" in capsys.readouterr().out


def test_conformance_fails_a_backend_that_copies(installed, capsys):
    installed({"dist-copy": {"copy": COPYING.format(name="copy", gaps={})}})
    assert main(["conformance", "--backend", "copy", "--only", "exchange/int64", "-q"]) == 1
    out = capsys.readouterr().out
    assert "exchange/int64/contiguous  fail" in out and "contiguous round trip copied (must be zero-copy)" in out
    assert "[contract: Exchange in sglang_fx/spi.py]" in out  # a failure names the contract it broke


# A backend that does not declare bfloat16 on the CPU.
NO_BF16 = DELEGATING.replace('name="{name}", known_gaps={gaps})', """name="{name}", known_gaps={gaps},
        capabilities=replace(ref.sglang_fx_backend_info().capabilities, dtypes={{"cpu": frozenset({{"float32", "float16"}})}}))""")


def test_conformance_list_and_cases_skipped_by_the_declared_dtypes(installed, capsys):
    installed({"dist-nb": {"nb": NO_BF16.format(name="nb", gaps={})}})
    assert main(["conformance", "--backend", "nb", "--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "SKIPPED: bfloat16 is not among the dtypes nb declares on cpu (float16, float32)" in lines["exchange/bfloat16/contiguous"]
    assert "without a copy" in lines["exchange/float16/contiguous"] and "[Exchange in sglang_fx/spi.py]" in lines["exchange/float16/contiguous"]
    assert "[Attention in sglang_fx/spi.py]" in lines["attention/page16/decode"]
    assert "within 1e-4 of transformers" in lines["logits/Qwen3ForCausalLM"]
    assert main(["conformance", "--backend", "nb", "--only", "exchange/bfloat16", "--only", "exchange/float16", "-q"]) == 0
    out = capsys.readouterr().out
    assert "nb: 2 passed, 0 failed, 2 skipped" in out and "exchange/bfloat16/strided     skipped" in out


def test_known_gaps_expected_failures_and_unexpected_passes(installed):
    gaps = {"exchange/int64/contiguous": "copies on purpose", "attention/page1/decode": "wrongly listed"}
    installed({"dist-copy": {"copy": COPYING.format(name="copy", gaps=gaps)}})
    report = run("copy", select=lambda n: n in gaps, progress=None)
    status = {c.name: (c.status, c.passed) for c in report.cases}
    assert status == {"exchange/int64/contiguous": ("known gap", True), "attention/page1/decode": ("unexpected pass", False)}
    assert not report.passed


def test_conformance_unknown_backend_exits_2(installed, capsys):
    installed({})
    assert main(["conformance", "--backend", "nope"]) == 2
    assert "unknown sglang-fx backend 'nope'; installed backends: none" in capsys.readouterr().err


def test_make_tiny_model(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["make-tiny-model", "--arch", "llama", str(out), "--seed", "3", "--set", "num_hidden_layers=1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 1
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
