"""Framework-neutral checkpoint reading, and its errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from sglang_fx.checkpoint import Checkpoint, expected_weights, load_spec
from sglang_fx.errors import CheckpointError, UnsupportedConfigError


@pytest.fixture
def copy_of(tiny, tmp_path):
    def make(arch="qwen3", **kw):
        dst = tmp_path / "model"
        shutil.copytree(tiny(arch, **kw), dst)
        return dst

    return make


@pytest.mark.parametrize("arch,tied,bias,qk_norm", [("qwen3", True, False, True), ("qwen2", False, True, False), ("llama", False, False, False)])
def test_spec_and_weights(tiny, arch, tied, bias, qk_norm):
    spec = load_spec(tiny(arch))
    assert (spec.tie_word_embeddings, spec.attention_bias, spec.qk_norm) == (tied, bias, qk_norm)
    assert spec.dtype == torch.float32 and spec.num_kv_heads == 2 and spec.head_dim == 16
    weights = Checkpoint(tiny(arch)).load(spec)
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected_weights(spec)
    assert (weights["lm_head.weight"] is weights["model.embed_tokens.weight"]) == tied


def test_sharded_checkpoint_matches_single_file(tiny):
    single, sharded = tiny("llama"), tiny("llama", shards=3)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    spec = load_spec(single)
    a, b = Checkpoint(single).load(spec), Checkpoint(sharded).load(spec)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_dtype_override(tiny):
    spec = load_spec(tiny("qwen3"), "bfloat16")
    assert Checkpoint(tiny("qwen3")).load(spec)["model.norm.weight"].dtype == torch.bfloat16
    with pytest.raises(UnsupportedConfigError, match=r"dtype 'int8' is not supported; use one of: float32, float16, bfloat16"):
        load_spec(tiny("qwen3"), "int8")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json not found: a model directory needs an HF config.json"):
        load_spec(tmp_path)


def test_malformed_config(copy_of):
    path = copy_of()
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_spec(path)


def test_unsupported_architecture(copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"architecture \['GPT2LMHeadModel'\] is not supported; supported: Qwen3ForCausalLM"):
        load_spec(path)


def test_no_weights(copy_of):
    path = copy_of()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*expected model.safetensors or model.safetensors.index.json"):
        Checkpoint(path)


def test_missing_tensor_names_tensor_and_file(copy_of):
    path = copy_of()
    spec = load_spec(path)
    weights = Checkpoint(path).load(spec)
    del weights["lm_head.weight"]
    weights = {n: t.clone() for n, t in weights.items() if n != "model.layers.1.mlp.up_proj.weight"}
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing from model.safetensors"):
        Checkpoint(path).load(spec)


def test_mis_shaped_tensor(copy_of):
    path = copy_of()
    spec = load_spec(path)
    weights = {n: t.clone() for n, t in Checkpoint(path).load(spec).items() if n != "lm_head.weight"}
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' in .*model.safetensors has shape \[7\], expected \[64\]"):
        Checkpoint(path).load(spec)


def test_truncated_file(copy_of):
    path = copy_of()
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
        Checkpoint(path).load(load_spec(path))


def test_index_naming_a_missing_shard(copy_of):
    path = copy_of("llama", shards=2)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match=r"lists shard 'model-00002-of-00002.safetensors', which is missing"):
        Checkpoint(path)


def test_unsupported_rope_scaling(copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"RoPE scaling 'yarn' is not supported yet"):
        load_spec(path)


def test_moe_and_mla_specs(tiny):
    moe = load_spec(tiny("qwen3_moe"))
    assert (moe.moe.num_experts, moe.moe.top_k, moe.moe.scoring, moe.mla) == (8, 2, "softmax", None)
    assert moe.is_moe_layer(0) and moe.is_moe_layer(1)
    ds = load_spec(tiny("deepseek_v3"))
    assert ds.moe.scoring == "sigmoid" and ds.moe.num_shared_experts == 1 and ds.moe.routed_scaling_factor == 2.5
    assert not ds.is_moe_layer(0) and ds.is_moe_layer(1) and ds.is_moe_layer(2)  # first_k_dense_replace=1
    assert (ds.mla.kv_lora_rank, ds.mla.qk_rope_head_dim, ds.mla.qk_head_dim, ds.mla.rope_interleave) == (32, 8, 24, True)
    weights = Checkpoint(tiny("deepseek_v3")).load(ds)
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0  # random, not HF's zeros
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected_weights(ds)


def test_other_quantization_methods_are_refused(copy_of):
    path = copy_of()
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"quantization method 'fp8' is not supported; sglang-fx runs compressed-tensors W8A8"):
        load_spec(path)
