"""The SGLang plugin's decisions, without starting SGLang (its lookups are stubbed)."""

from __future__ import annotations

import importlib.metadata as md
from types import SimpleNamespace

import pytest

from sglang_fx.registry import Registry
from sglang_fx.sglang import compat, plugin
from sglang_fx.sglang.launch_server import wants_cpu

SGLANG_IMPLS = frozenset({"auto", "sglang", "transformers", "mindspore"})


@pytest.fixture
def registry(monkeypatch):
    eps = [
        md.EntryPoint(name, "sglang_fx_reference_torch.plugin", "sglang_fx.backends")
        for name in ("reference_torch", "sglang", "transformers", "auto", "mindspore")
    ]
    reg = Registry(entry_points=eps)
    monkeypatch.setattr(plugin, "default_registry", lambda: reg)
    monkeypatch.setattr(compat, "sglang_model_impls", lambda: SGLANG_IMPLS)
    monkeypatch.setattr(compat, "server_view", lambda server_args: server_args)
    return reg


def test_names_of_sglang_implementations_are_refused(registry, caplog):
    assert plugin.backend_names() == ["mindspore", "reference_torch"]
    for name in ("auto", "sglang", "transformers"):
        assert f"backend {name!r}" in caplog.text and "is SGLang's own implementation" in caplog.text


def test_check_server_args_routes_by_name(registry, monkeypatch):
    monkeypatch.setattr(plugin, "_backends", ["reference_torch"])
    checked, calls = [], []
    monkeypatch.setattr(plugin, "check_backend", lambda name, sa: checked.append(name))

    def original(server_args):
        calls.append(server_args.model_impl)
        return "ok"

    assert plugin.check_server_args(original, SimpleNamespace(model_impl="sglang")) == "ok"
    # Off CPU: no scheduler-loop declaration (that path is tests/test_sglang_pd_args.py's).
    backend_args = SimpleNamespace(model_impl="reference_torch", device="cuda", disable_overlap_schedule=False)
    assert plugin.check_server_args(original, backend_args) == "ok"
    assert checked == ["reference_torch"] and calls == ["sglang", "reference_torch"]
    with pytest.raises(ValueError, match="'nope' is neither an SGLang implementation nor an installed sglang-fx backend; valid values: auto, mindspore, reference_torch, sglang, transformers"):
        plugin.check_server_args(original, SimpleNamespace(model_impl="nope"))


def test_get_model_architecture_builds_the_adapter_only_for_backends(monkeypatch):
    monkeypatch.setattr(plugin, "_backends", ["reference_torch"])
    monkeypatch.setattr(compat, "resolved_model_impl", lambda name: "SGLANG")
    native = plugin.get_model_architecture(lambda cfg: ("Native", "Qwen3ForCausalLM"), SimpleNamespace(model_impl="sglang"))
    assert native == ("Native", "Qwen3ForCausalLM")
    cfg = SimpleNamespace(model_impl="reference_torch")
    cls, arch = plugin.get_model_architecture(lambda cfg: pytest.fail("SGLang's resolution was used"), cfg)
    assert cls.backend_name == "reference_torch" and arch == cls.__name__ == "SglangFx_reference_torch_ForCausalLM"
    assert cfg._resolved_model_arch == arch and cfg._resolved_model_impl == "SGLANG"


def test_launch_server_sets_the_cpu_engine_only_for_cpu():
    assert wants_cpu(["--model-path", "m", "--device", "cpu"])
    assert wants_cpu(["--device=cpu"])
    assert not wants_cpu(["--device", "cuda"])
    assert not wants_cpu(["--model-path", "m"])


def test_backend_options_from_the_environment(monkeypatch):
    from sglang_fx.errors import UnsupportedConfigError
    from sglang_fx.sglang import OPTIONS_ENV, backend_options

    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    assert backend_options("mindspore") == {}
    monkeypatch.setenv(OPTIONS_ENV, '{"mindspore": {"decode_batches": "1,2,4,8", "mode": "jit"}}')
    assert backend_options("mindspore") == {"decode_batches": "1,2,4,8", "mode": "jit"}
    assert backend_options("reference_torch") == {}  # options are per backend
    monkeypatch.setenv(OPTIONS_ENV, "{mindspore: jit}")
    with pytest.raises(UnsupportedConfigError, match=r"SGLANG_FX_OPTIONS is not valid JSON .*expected e.g. '\{\"mindspore\""):
        backend_options("mindspore")
    monkeypatch.setenv(OPTIONS_ENV, '{"mindspore": {"decode_batches": 8}}')
    with pytest.raises(UnsupportedConfigError, match=r"SGLANG_FX_OPTIONS must map backend names to objects of string options"):
        backend_options("mindspore")


def test_unknown_backend_options_fail_at_startup(registry, monkeypatch):
    """Checked in the launcher against the backend's declared Capabilities.options."""
    from sglang_fx.sglang import OPTIONS_ENV

    model_config = SimpleNamespace(hf_config=SimpleNamespace(architectures=["Qwen3ForCausalLM"]), dtype="torch.float32")
    monkeypatch.setattr(compat, "server_model_config", lambda server_args: model_config)
    args = SimpleNamespace(model_impl="reference_torch", device="cpu", page_size=1, tp_size=1, ep_size=1, disable_cuda_graph=True)
    monkeypatch.setenv(OPTIONS_ENV, '{"reference_torch": {"mode": "jit"}}')
    with pytest.raises(ValueError, match=r"sglang-fx backend 'reference_torch' cannot serve this: .*unknown backend option\(s\) mode; the options it takes: none"):
        plugin.check_backend("reference_torch", args)
    monkeypatch.setenv(OPTIONS_ENV, '{"mindspore": {"mode": "jit"}}')  # another backend's options
    plugin.check_backend("reference_torch", args)


def test_quantized_checkpoints_at_startup(registry, monkeypatch, tmp_path):
    """The hook serve_quantized_at_any_dtype builds no SGLang quantization config for sglang-fx
    names (native keeps SGLang's); the launcher refuses a scheme the backend does not declare,
    naming it and what the backend runs."""
    from dataclasses import replace

    from sglang_fx.quantize import quantize
    from sglang_fx.sglang.quantization import serve_quantized_at_any_dtype
    from sglang_fx.tiny import make_tiny_model

    assert serve_quantized_at_any_dtype(lambda cfg: "sglang's", SimpleNamespace(model_impl="sglang")) == "sglang's"
    assert serve_quantized_at_any_dtype(lambda cfg: "sglang's", SimpleNamespace(model_impl="reference_torch")) is None
    model = quantize(make_tiny_model("qwen3", tmp_path / "f"), tmp_path / "q")
    model_config = SimpleNamespace(hf_config=SimpleNamespace(architectures=["Qwen3ForCausalLM"]), dtype="torch.float32")
    monkeypatch.setattr(compat, "server_model_config", lambda server_args: model_config)
    args = SimpleNamespace(model_impl="reference_torch", device="cpu", page_size=1, tp_size=1, ep_size=1,
                           disable_cuda_graph=True, model_path=str(model))  # fmt: skip
    plugin.check_backend("reference_torch", args)  # declares w8a8_int8
    info = registry.info("reference_torch")
    float_only = replace(info, capabilities=replace(info.capabilities, quantization=frozenset()))
    monkeypatch.setattr(type(registry), "available_info", lambda self, name, isolated=False: float_only)
    with pytest.raises(ValueError, match=r"quantized checkpoints of scheme 'w8a8_int8' are not supported; the schemes it runs: none"):
        plugin.check_backend("reference_torch", args)
