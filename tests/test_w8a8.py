"""W8A8 int8 checkpoints: the rounding rule, reading and refusing checkpoints, sharding the scales,
`sglang-fx quantize`, a checkpoint written by compressed-tensors' own code, and int8 in memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from sglang_fx.capabilities import Capabilities
from sglang_fx.checkpoint import Checkpoint, expected_weights, load_spec
from sglang_fx.errors import CheckpointError, UnsupportedConfigError
from sglang_fx.generate import Session
from sglang_fx.parallel import Group, Parallel, Rendezvous
from sglang_fx.quant import quantize_activations, w8a8_linear
from sglang_fx.quantize import quantize
from sglang_fx.sharding import Shard
from sglang_fx.tiny import make_tiny_model

from .sglang_support import available


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8")
    return {a: make_tiny_model(a, root / a, seed=0) for a in ("qwen3", "qwen2", "qwen3_moe", "deepseek_v3")}


@pytest.fixture(scope="module")
def quantized(floats, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8q")
    return {a: quantize(p, root / a) for a, p in floats.items()}


def test_the_rounding_rule():
    x = np.array([[127.0, 0.5, 1.5, -2.5, 2.4999], [0, 0, 0, 0, 0]], np.float32)
    q, scale = quantize_activations(x)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (2, 1)
    assert q[0].tolist() == [127, 0, 2, -2, 2]  # absmax 127 -> scale 1; halves to even
    assert q[1].tolist() == [0] * 5 and scale[1, 0] == np.float32(1e-10) / np.float32(127)  # the floor


def test_w8a8_linear_is_the_integer_math():
    g = np.random.default_rng(0)
    x, w = g.standard_normal((5, 64), np.float32), g.integers(-127, 128, (32, 64)).astype(np.int8)
    ws = g.random((32, 1), np.float32) / 100
    q, xs = quantize_activations(x)
    exact = (q.astype(np.float64) @ w.astype(np.float64).T) * xs * ws.T
    assert np.abs(w8a8_linear(x, w, ws) - exact).max() <= 1e-6 * np.abs(exact).max()


def test_quantized_checkpoint_loads_int8(quantized):
    spec = load_spec(quantized["qwen3_moe"])
    assert spec.quant.scheme == "w8a8_int8"
    assert "model.layers.0.self_attn.q_proj" in spec.quant.linears and "model.layers.0.mlp.experts.3.down_proj" in spec.quant.linears
    assert not {"lm_head", "model.layers.0.mlp.gate"} & spec.quant.linears
    w = Checkpoint(quantized["qwen3_moe"]).load(spec)
    assert w["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert w["model.layers.0.self_attn.q_proj.weight_scale"].dtype == torch.float32
    assert w["model.layers.0.self_attn.q_proj.weight_scale"].shape == (spec.num_heads * spec.head_dim, 1)
    assert w["model.layers.0.mlp.gate.weight"].dtype == torch.float32 and w["lm_head.weight"].dtype == torch.float32
    assert {n: tuple(t.shape) for n, t in w.items()} == expected_weights(spec)
    ds = load_spec(quantized["deepseek_v3"])
    assert not any(n.endswith("kv_b_proj") for n in ds.quant.linears) and "model.layers.0.self_attn.kv_a_proj_with_mqa" in ds.quant.linears


def test_quantize_matches_the_float_weights(floats, quantized):
    f = Checkpoint(floats["qwen2"]).load(load_spec(floats["qwen2"]))
    spec = load_spec(quantized["qwen2"])
    q = Checkpoint(quantized["qwen2"]).load(spec)
    n = "model.layers.1.mlp.down_proj"
    scale = q[n + ".weight_scale"]
    assert torch.allclose(scale[:, 0], f[n + ".weight"].abs().amax(1) / 127)
    assert ((q[n + ".weight"].float() * scale - f[n + ".weight"]).abs() <= scale / 2 + 1e-7).all()
    assert torch.equal(q["model.layers.0.self_attn.q_proj.bias"], f["model.layers.0.self_attn.q_proj.bias"])  # biases stay float
    with pytest.raises(UnsupportedConfigError, match="already quantized"):
        quantize(quantized["qwen2"], quantized["qwen2"].parent / "again")


def _edit(src, dst, change):
    shutil.copytree(src, dst)
    from safetensors.torch import load_file, save_file

    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale"), r"tensor 'model.layers.0.mlp.up_proj.weight_scale' is missing"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t["model.layers.0.mlp.up_proj.weight"].float()}),
         r"tensor 'model.layers.0.mlp.up_proj.weight' in .* is F32, but config.json's quantization_config makes it an int8"),
        (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight_scale": torch.ones(64)}),
         r"tensor 'model.layers.1.self_attn.o_proj.weight_scale' in .* has shape \[64\], expected \[64, 1\]"),
        (lambda t: t.update({"model.layers.1.self_attn.o_proj.weight_scale": torch.ones(64, 1, dtype=torch.int32)}),
         r"tensor 'model.layers.1.self_attn.o_proj.weight_scale' in .* is I32; a weight scale must be F32, F16 or BF16"),
    ],
)
def test_malformed_quantized_checkpoints_name_the_tensor(quantized, tmp_path, change, message):
    path = _edit(quantized["qwen3"], tmp_path / "bad", change)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(path).load(load_spec(path))


def _with_config(src, dst, edit):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda q: q["config_groups"]["group_0"].update(input_activations=None), r"not W8A8 int8 \(input activations none\)"),
        (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor"),
         r"input activations strategy='tensor', dynamic=False"),
        (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), r"weights num_bits=4"),
        (lambda q: q.update(ignore=[]), r"'lm_head' is quantized, but sglang-fx keeps the LM head, MoE routers and MLA's kv_b_proj float"),
        (lambda q: q["config_groups"]["group_0"].update(targets=["re:.*nothing$"]), r"targets match no linear layer"),
    ],
)
def test_unsupported_schemes_are_refused_with_the_reason(quantized, tmp_path, edit, message):
    path = _with_config(quantized["qwen3"], tmp_path / "other", edit)
    with pytest.raises(UnsupportedConfigError, match=message):
        load_spec(path)


def test_modelslim_is_refused_with_why(floats, tmp_path):
    path = tmp_path / "slim"
    shutil.copytree(floats["qwen3"], path)
    (path / "quant_model_description_w8a8.json").write_text(json.dumps({"model.layers.0.self_attn.q_proj.weight": "W8A8"}))
    with pytest.raises(UnsupportedConfigError, match=r"ModelSlim .* is static .* `sglang-fx quantize SRC DST --scheme w8a8`"):
        load_spec(path)


def test_scales_shard_with_their_weights(quantized):
    spec = load_spec(quantized["qwen3"])  # 4 heads, 2 KV heads, head 16, MLP 128
    whole = Checkpoint(quantized["qwen3"]).load(spec)
    for rank in (0, 1):
        shard = Shard.of(spec, Parallel(Group("tp:0", (0, 1), rank), rendezvous=Rendezvous("127.0.0.1", 1, 2, rank)))
        part = Checkpoint(quantized["qwen3"]).load(spec, shard)
        q = "model.layers.0.self_attn.q_proj.weight_scale"  # column-parallel: split with the rows
        assert torch.equal(part[q], whole[q][rank * 32 : (rank + 1) * 32])
        for row_parallel in ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"):  # whole on every rank
            assert torch.equal(part[row_parallel + ".weight_scale"], whole[row_parallel + ".weight_scale"])
            cols = shard.split(row_parallel + ".weight")[1]  # the weight itself splits by input columns
            assert torch.equal(part[row_parallel + ".weight"], whole[row_parallel + ".weight"][:, cols.start : cols.stop])
        assert part["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8


def test_capabilities_refuse_undeclared_schemes(quantized, floats):
    old = Capabilities(dtypes={"cpu": frozenset({"float32"})}, architectures=frozenset({"Qwen3ForCausalLM"}))  # as a 1.1 backend declares
    assert old.validate(quantization=None) == []
    assert old.validate(quantization="w8a8_int8") == [
        "quantized checkpoints of scheme 'w8a8_int8' are not supported; the schemes it runs: none (float checkpoints only); "
        "use a float checkpoint or a backend that declares the scheme"
    ]
    new = Capabilities(dtypes={"cpu": frozenset({"float32"})}, architectures=frozenset(), quantization=frozenset({"w8a8_int8"}))
    assert new.validate(quantization="w8a8_int8") == [] and "quantization [w8a8_int8]" in new.describe()
    assert "the schemes it runs: w8a8_int8" in new.validate(quantization="fp8")[0]


def _arrays(obj, seen=None):
    """Every array (torch, NumPy, JAX, MindSpore: anything with shape, dtype and nbytes) reachable
    from obj's attributes, dicts, lists, tuples (once each)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type, types.ModuleType)) or obj is None:
        return
    seen.add(id(obj))
    if all(hasattr(obj, a) for a in ("shape", "dtype", "nbytes")):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _arrays(v, seen)
    elif hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _arrays(v, seen)


def _held(session) -> tuple[int, int]:
    """(bytes of every array the session's runner holds, elements of its int8 arrays)."""
    arrays = list(_arrays(session.runner))
    return sum(int(a.nbytes) for a in arrays), sum(int(np.prod(a.shape)) for a in arrays if str(a.dtype).lower().endswith("int8"))


@pytest.mark.parametrize("backend", ["reference_torch", "numpy", "jax", "mindspore"])
def test_quantized_linears_stay_int8_in_memory(floats, quantized, backend):
    """Each backend's quantized linear weights (int8 plus scales) take at most 0.3x their float32
    bytes, and no float copy of them exists (weights dequantized at load would fail). Measured
    whatever the backend's layout (transposed, fused, norms folded): the runner of the W8A8
    checkpoint holds every quantized weight's elements as int8, and at most 0.3x their float32
    bytes more than the runner of the float checkpoint holds besides them."""
    if not available(backend):
        pytest.skip(f"{backend} is not installed")
    spec = load_spec(quantized["qwen3"], "float32")
    linear_elements = sum(a * b for n in spec.quant.linears for a, b in [expected_weights(spec)[n + ".weight"]])
    float_total, _ = _held(Session(backend, floats["qwen3"], dtype="float32", max_total_tokens=64))
    total, int8_elements = _held(Session(backend, quantized["qwen3"], dtype="float32", max_total_tokens=64))
    assert int8_elements == linear_elements, (int8_elements, linear_elements)
    assert total - (float_total - 4 * linear_elements) <= 0.3 * 4 * linear_elements, (total, float_total, linear_elements)


def test_quantize_cli_and_compressed_tensors_reads_it(floats, tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "-m", "sglang_fx.cli", "quantize", str(floats["qwen3"]), str(out), "--scheme", "w8a8"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    assert (qc.format, scheme.weights.strategy, scheme.input_activations.strategy, scheme.input_activations.dynamic) == (
        "int-quantized", "channel", "token", True)
    assert qc.ignore == ["lm_head"]


def test_a_checkpoint_written_by_compressed_tensors(floats, quantized, tmp_path):
    """compressed-tensors' own compressor (scale = absmax / 127.5, weights in [-128, 127]) writes a
    W8A8 checkpoint of the float Qwen3; the loader reads it, and the reference backend's logits sit
    as close to ours as the two weight roundings allow."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(floats["qwen3"], dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])}, ignore=["lm_head"]))
    for m in model.modules():
        if getattr(m, "quantization_scheme", None) is not None:
            scale, zp = calculate_qparams(m.weight.amin(1, keepdim=True), m.weight.amax(1, keepdim=True), m.quantization_scheme.weights)
            m.weight_scale.data.copy_(scale)
            m.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    out = tmp_path / "ct"
    model.save_pretrained(out)
    compressor.update_config(out)
    spec = load_spec(out)
    assert spec.quant.linears == load_spec(quantized["qwen3"]).quant.linears
    assert Checkpoint(out).load(spec)["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    # Independent of every backend: transformers with its weights dequantized, inputs fake-quantized.
    from sglang_fx.conformance.cases import W8A8_TOLERANCE
    from sglang_fx.conformance.context import fake_quantized

    prompt = [5, 17, 99, 250, 3, 42, 77, 301]
    session = Session("reference_torch", out, dtype="float32", max_total_tokens=64)
    seq, _ = session.new_sequence(prompt)
    ours = session.forward([seq], [prompt], logits="all")
    with torch.inference_mode():
        truth = fake_quantized(model.__class__.from_pretrained(floats["qwen3"], dtype=torch.float32), out)(torch.tensor([prompt])).logits[0]
    assert (ours - truth).abs().max() <= W8A8_TOLERANCE


#: A backend written for SPI 1.2 (before quantization): the reference backend declaring no scheme.
BEFORE_QUANTIZATION = """
from dataclasses import replace
from sglang_fx import hookimpl
import sglang_fx_reference_torch.plugin as ref

@hookimpl
def sglang_fx_backend_info():
    info = ref.sglang_fx_backend_info()
    return replace(info, name="older", spi_version="1.2", capabilities=replace(info.capabilities, quantization=frozenset()))

sglang_fx_make_exchange = ref.sglang_fx_make_exchange
sglang_fx_make_kv_cache = ref.sglang_fx_make_kv_cache
sglang_fx_make_attention = ref.sglang_fx_make_attention
sglang_fx_make_runner = ref.sglang_fx_make_runner
"""


def test_undeclared_scheme_refused_at_start_up(quantized, fake_registry):
    backend = fake_registry({"dist-older": {"older": BEFORE_QUANTIZATION}}).load("older")
    with pytest.raises(UnsupportedConfigError, match=r"scheme 'w8a8_int8' are not supported; the schemes it runs: none"):
        Session(backend, quantized["qwen3"], dtype="float32", max_total_tokens=64)
