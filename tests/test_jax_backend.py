"""The JAX backend beyond the conformance suite: what it refuses and why, what it copies per step
(only the step's new K/V rows into the pool, nothing of the pool inside its programs), shape
buckets, precompiling, and JAX's persistent compilation cache across processes."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("jax")

from sglang_fx.errors import UnsupportedConfigError  # noqa: E402
from sglang_fx.exchange import shares_memory  # noqa: E402
from sglang_fx.generate import Session  # noqa: E402
from sglang_fx.kv_pool import KVLayout  # noqa: E402
from sglang_fx.registry import load_backend  # noqa: E402
from sglang_fx.spi import RunnerOptions  # noqa: E402
from sglang_fx_jax import attention, plugin  # noqa: E402
from sglang_fx_jax.kv_cache import JaxKVCache  # noqa: E402

PROMPTS = [[5, 17, 99, 250, 3, 42, 77], [3, 42], [260, 14, 8, 9, 10]]


@pytest.fixture(scope="module")
def backend():
    return load_backend("jax")


@pytest.fixture(scope="module")
def ex(backend):
    return backend.exchange("cpu")


# ---------------------------------------------------------------------------------------------
# Refused, with the reason and the fix
# ---------------------------------------------------------------------------------------------


def test_unavailable_without_jax_or_beside_numpy_2(monkeypatch):
    import importlib.util

    import numpy

    monkeypatch.setattr(numpy, "__version__", "2.1.0")
    info = plugin.sglang_fx_backend_info()
    assert info.capabilities is None and "numpy 2.1.0 is installed" in info.unavailable
    assert "pip install jax==0.7.1 jaxlib==0.7.1 'numpy<2'" in info.unavailable
    monkeypatch.undo()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a))
    info = plugin.sglang_fx_backend_info()
    assert info.unavailable == "jax is not installed: pip install jax==0.7.1 jaxlib==0.7.1 'numpy<2'"
    monkeypatch.undo()
    assert plugin.sglang_fx_backend_info().unavailable is None


def test_an_unaligned_buffer_is_refused_without_a_copy_and_copied_with_one(ex):
    base = torch.arange(65, dtype=torch.float32)
    t = base[1:]  # 4 bytes past an aligned start: XLA would copy it
    with pytest.raises(BufferError, match="not 64-byte aligned"):
        ex.from_torch(t, copy=False)
    x = ex.from_torch(t)  # copy=None: allowed to copy
    back = ex.to_torch(x)
    assert torch.equal(back, t) and not shares_memory(back, t)
    layout = KVLayout(num_layers=1, num_pages=4, page_size=16, k_shape=(1, 16), v_shape=None, dtype=torch.float32)
    buf = torch.zeros(layout.num_slots * 16 + 1)[1:].view(layout.num_slots, 1, 16)
    with pytest.raises(BufferError, match="not 64-byte aligned"):
        JaxKVCache(layout, [buf], None, ex)


def test_unsupported_configurations_are_refused_by_name(backend, tiny):
    from sglang_fx.checkpoint import Checkpoint, load_spec

    assert any("dtype 'float64'" in p for p in backend.info.capabilities.validate(dtype="float64", device="cpu"))
    assert any("device 'cuda:0' is not supported" in p for p in backend.info.capabilities.validate(device="cuda:0"))
    path = tiny("qwen3")
    spec = load_spec(path, "float32")
    weights = Checkpoint(path).load(spec)
    from dataclasses import replace

    cases = [
        (replace(spec, architecture="GPT2LMHeadModel"), {}, "cpu", "architecture 'GPT2LMHeadModel' is not supported"),
        (spec, {}, "cuda:0", "device 'cuda:0' is not supported; supported devices: cpu"),
        (spec, {"decode_batch": "1"}, "cpu", r"unknown option\(s\) \['decode_batch'\]; it takes decode_batches, precompile, layers, extend, compile_cache"),
        (spec, {"layers": "loop"}, "cpu", "layers 'loop' is not unroll or scan"),
        (spec, {"layers": "scan", "extend": "layered"}, "cpu", "extend 'layered' is not layered \\(with layers=unroll\\) or whole"),
        (spec, {"extend": "chunked"}, "cpu", "extend 'chunked' is not layered"),
        (spec, {"moe": "sparse"}, "cpu", "moe 'sparse' is not auto, dense, gather"),
        (spec, {"decode_batches": "1,two"}, "cpu", "decode_batches '1,two' is not a comma-separated list of positive batch sizes"),
        (spec, {"decode_batches": "0"}, "cpu", "decode_batches '0' is not"),
        (spec, {"decode_batches": "1,2", "precompile": "4"}, "cpu", "precompile '4' is not none, all, or .* among 1,2"),
    ]
    for s, extra, device, message in cases:
        with pytest.raises(UnsupportedConfigError, match=message):
            backend.runner(s, weights, RunnerOptions(device, extra))


def test_one_compile_cache_per_process(tiny, tmp_path):
    """JAX reads its cache directory once: a second runner that asks for another is refused."""
    code = f"""
from sglang_fx.generate import Session
from sglang_fx.errors import UnsupportedConfigError
Session("jax", {str(tiny("qwen3"))!r}, options={{"compile_cache": {str(tmp_path / "a")!r}}})
try:
    Session("jax", {str(tiny("qwen3"))!r}, options={{"compile_cache": "none"}})
except UnsupportedConfigError as e:
    print("refused:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused: jax backend: this process already uses compile_cache" in out.stdout, out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# What a step copies
# ---------------------------------------------------------------------------------------------


def test_a_step_copies_only_its_new_kv_rows_into_the_pool(tiny, monkeypatch):
    """Per step the host stores exactly T new rows per layer for K and for V into the pool, and
    nothing else of the pool changes; the pool is read through aliases (the KVCache's arrays
    share the host buffers), and the compiled programs copy no pool buffer (their optimized HLO has
    no copy of one): the layer program of the layered extend step and the decode body."""
    s = Session("jax", tiny("qwen3"), dtype="float32", page_size=16, max_total_tokens=1024, options={"decode_batches": "1,2,4"})
    layout, cache = s.layout, s.cache
    assert all(shares_memory(torch.from_dlpack(a), b) for a, b in zip(cache.keys + cache.values, s.pool.k_buffers + s.pool.v_buffers))
    copied, calls = [], []
    original = torch.Tensor.index_copy_

    def counted(self, dim, index, source):
        copied.append(source.shape[0])
        return original(self, dim, index, source)

    body, layer = s.runner._body, s.runner._layer[False]
    monkeypatch.setattr(torch.Tensor, "index_copy_", counted)
    monkeypatch.setattr(s.runner, "_body", lambda *a: calls.append((body, a)) or body(*a))
    monkeypatch.setitem(s.runner._layer, False, lambda *a: calls.append((layer, a)) or layer(*a))
    seqs = [s.new_sequence(p)[0] for p in PROMPTS]
    s.forward(seqs, PROMPTS)  # prefill: 14 tokens
    assert copied == [14] * (2 * layout.num_layers), copied
    before = [b.clone() for b in s.pool.k_buffers + s.pool.v_buffers]
    copied.clear()
    s.forward(seqs, [[1], [2], [3]])  # decode: 3 sequences, padded to 4 inside the program
    assert copied == [3] * (2 * layout.num_layers), copied
    new = torch.tensor([s.pool.slots(q)[-1] for q in seqs])
    for a, b in zip(s.pool.k_buffers + s.pool.v_buffers, before):
        keep = torch.ones(layout.num_slots, dtype=torch.bool)
        keep[new] = False
        assert torch.equal(a[keep], b[keep]) and not torch.equal(a[new], b[new])

    pool_shape = f"f32[{layout.num_slots},{layout.k_shape[0]},{layout.k_shape[1]}]"
    assert [program for program, _ in calls] == [layer] * layout.num_layers + [body]
    for program, args in calls[-2:]:  # the extend step's layer program, the decode program
        hlo = program.lower(*args).compile().as_text()
        assert pool_shape in hlo
        assert not re.search(re.escape(pool_shape) + r"\{[0-9,]*\} copy", hlo), "the program copies a KV pool buffer"
        entry_root = next(line for line in hlo.split("ENTRY", 1)[1].splitlines() if line.strip().startswith("ROOT"))
        assert pool_shape not in entry_root, "the program returns a pool buffer"


# ---------------------------------------------------------------------------------------------
# Buckets, precompiling, the persistent compilation cache
# ---------------------------------------------------------------------------------------------


def test_decode_reuses_its_bucket_programs(tiny, caplog):
    """Decode steps of 1-4 sequences share the batch-4 program at one context bucket: after the
    first, no step compiles (one log line per new bucket), and the tokens equal an unpadded run's."""
    s = Session("jax", tiny("qwen3"), dtype="float32", page_size=16, options={"decode_batches": "4"})
    ref = Session("reference_torch", tiny("qwen3"), dtype="float32", page_size=16)
    with caplog.at_level(logging.INFO, logger="sglang_fx_jax.model"):
        for batch in (PROMPTS[:1], PROMPTS, PROMPTS + PROMPTS[:1], PROMPTS[:2]):  # 1, 3, 4, 2 sequences
            assert s.generate(batch, 6) == ref.generate(batch, 6)
    decode = [r.message for r in caplog.records if "decode step" in r.message]
    assert len(decode) == 1 and f"bucket ('decode', 4, {attention.DECODE_CONTEXT})" in decode[0], decode


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_scanned_layers_match_unrolled_ones(tiny, arch):
    """layers=scan (one traced layer per segment of like layers: DeepSeek-V3's dense layer, then
    its MoE ones) and extend=whole (the unrolled body for extend steps too) compute what the
    default (unrolled, extend steps layer by layer) does."""
    model = tiny(arch)
    out = {}
    for name, options in {"unroll": {}, "scan": {"layers": "scan"}, "whole": {"extend": "whole"}}.items():
        s = Session("jax", model, dtype="float32", page_size=16, options=options)
        seqs = [s.new_sequence(p)[0] for p in PROMPTS]
        out[name] = (s.forward(seqs, PROMPTS, logits="all"), s.forward(seqs, [[1], [2], [3]]), s.runner.decoder.segments)
    for name in ("scan", "whole"):
        assert (out[name][0] - out["unroll"][0]).abs().max() < 1e-5 and (out[name][1] - out["unroll"][1]).abs().max() < 1e-5
    if arch == "deepseek_v3":
        assert [seg.moe for seg in out["scan"][2]] == [False, True]


def test_precompile_compiles_at_the_first_step(tiny, caplog):
    s = Session("jax", tiny("qwen3"), dtype="float32", page_size=16, options={"decode_batches": "1,2", "precompile": "all"})
    with caplog.at_level(logging.INFO, logger="sglang_fx_jax.model"):
        s.generate(PROMPTS[:2], 3)
    lines = [r.message for r in caplog.records]
    for label in ("prefill compiled", "decode batch 1 compiled", "decode batch 2 compiled"):
        assert any(label in line for line in lines), lines
    assert sum("compiled and ran" in line for line in lines) == 3, lines  # the real steps found the precompiled programs


def test_the_persistent_cache_serves_a_second_process(tiny, tmp_path):
    """Two processes with one compile_cache directory: the first writes the programs, the second
    loads them from it (JAX logs a cache hit for every program) and gives the same tokens."""
    cache = tmp_path / "xla"
    code = f"""
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
from sglang_fx.generate import Session
s = Session("jax", {str(tiny("qwen3"))!r}, options={{"compile_cache": {str(cache)!r}, "decode_batches": "2"}})
print("tokens", s.generate({PROMPTS[:2]!r}, 4))
"""

    def run() -> str:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    first = run()
    assert any(cache.iterdir()), "nothing was written to the compile cache"
    second = run()
    tokens = [line for line in first.splitlines() if line.startswith("tokens")]
    assert tokens and tokens == [line for line in second.splitlines() if line.startswith("tokens")]
    hits = re.findall(r"Persistent compilation cache hit for '(jit_\w+)'", second)
    assert {"jit_body", "jit_head"} <= set(hits), second[-3000:]
    assert not re.findall(r"Persistent compilation cache hit for 'jit_(body|head)'", first)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_agrees_with_the_reference(tiny, dtype):
    """XLA's CPU backend computes bfloat16 and float16 (by widening): logits within the suite's
    tolerance of reference_torch in the same dtype, after a prefill and a decode step."""
    from sglang_fx.conformance.context import TOLERANCE

    out = {}
    for name in ("jax", "reference_torch"):
        s = Session(name, tiny("qwen3"), dtype=dtype, page_size=16)
        seqs = [s.new_sequence(p)[0] for p in PROMPTS]
        out[name] = torch.cat([s.forward(seqs, PROMPTS), s.forward(seqs, [[1], [2], [3]])])
    assert out["jax"].dtype == torch.float32
    assert (out["jax"] - out["reference_torch"]).abs().max() <= TOLERANCE[getattr(torch, dtype)]


# ---------------------------------------------------------------------------------------------
# Attention memory: linear in the step's tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extend", ["layered"])  # "whole" takes the same attention; its compile takes minutes here
def test_an_8k_prompt_takes_linear_attention_memory(tiny, monkeypatch, extend):
    """An 8192-token prompt in one extend step: XLA's own account of the compiled program
    (`memory_analysis`: its temporaries and outputs, besides the arguments, which are the weights,
    the pool and the step's index arrays) stays under 300 MB, where one [T, T] float32 score
    matrix per head would be 1 GiB: the layer program of a layered step (called per layer), or
    the whole body. And the step computes what the same prompt in two chunks of 4096 tokens (the
    second after the cached first) does."""
    model = tiny("qwen3", max_position_embeddings=8192)
    prompt = [(7 * j) % 500 + 3 for j in range(8192)]
    s = Session("jax", model, dtype="float32", page_size=16, max_total_tokens=2 * 8192 + 64, options={"extend": extend})
    calls, program = [], s.runner._layer[False] if extend == "layered" else s.runner._body
    if extend == "layered":
        monkeypatch.setitem(s.runner._layer, False, lambda *a: calls.append(a) or program(*a))
    else:
        monkeypatch.setattr(s.runner, "_body", lambda *a: calls.append(a) or program(*a))
    whole = s.forward([s.new_sequence(prompt)[0]], [prompt])
    stats = program.lower(*calls[0]).compile().memory_analysis()
    used = stats.temp_size_in_bytes + stats.output_size_in_bytes
    assert used < 300e6, f"the 8k-token step takes {used / 1e6:.0f} MB besides its arguments"
    seq = s.new_sequence([1])[0]  # a fresh sequence, sharing no page
    for start in range(0, 8192, 4096):
        chunked = s.forward([seq], [prompt[start : start + 4096]])
    assert torch.isfinite(whole).all() and (whole - chunked).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# MoE dispatch
# ---------------------------------------------------------------------------------------------


def test_w8a8_linear_is_the_rule_and_an_int8_product():
    """`layers.quantize` gives sglang_fx.quant's q and scale bit for bit under jit (exact halves
    round to even, an all-zero row, an outlier); `layers.linear` on an Int8Weight lowers to an
    int8 x int8 -> int32 dot_general (no float copy of the weight) and matches the NumPy reference."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sglang_fx.quant import quantize_activations, w8a8_linear
    from sglang_fx_jax.layers import Int8Weight, linear, quantize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * torch.logspace(-3, 2, 6)[:, None]
    x[0] = 0
    x[1, 3] = 1e3
    x[2, :5], x[2, 5:] = torch.tensor([127.0, 0.5, 1.5, -2.5, 2.5]), 0  # absmax 127: scale 1, x / scale on the halves
    q_ref, s_ref = quantize_activations(x.numpy())
    assert q_ref[2, :5].tolist() == [127, 0, 2, -2, 2]
    q, s = jax.jit(quantize)(jnp.asarray(x.numpy()))
    assert np.array_equal(np.asarray(q), q_ref) and np.array_equal(np.asarray(s), s_ref)
    wq = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8).numpy()  # [out, in], as the checkpoint
    ws = (torch.rand(32, 1, generator=g) / 100).numpy()
    w = Int8Weight(jnp.asarray(wq.T.copy()), jnp.asarray(ws.reshape(-1)))  # stored [in, out]
    hlo = jax.jit(linear).lower(jnp.asarray(x.numpy()), w).as_text()
    assert re.search(r"dot_general.*\(tensor<6x64xi8>, tensor<64x32xi8>\) -> tensor<6x32xi32>", hlo), hlo
    ours, ref = np.asarray(jax.jit(linear)(jnp.asarray(x.numpy()), w)), w8a8_linear(x.numpy(), wq, ws)
    assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w8a8"])
@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_moe_gathered_experts_equal_the_dense_compute(tiny, tmp_path, arch, quantized):
    """`layers.moe` gathering each token's k experts gives what running every expert densely
    does, for a step the crossover gathers (1 token) and one it does not (8); and whole-model
    logits agree between the runner options moe=gather and moe=dense. W8A8: the int8 experts
    (an Int8Weight per projection, stacked by expert) on both paths, whose integer math is the
    same per (token, expert) and whose sums over experts differ only in order."""
    import jax.numpy as jnp

    from sglang_fx.quantize import quantize
    from sglang_fx_jax.layers import Int8Weight, gathers_experts, moe

    model = quantize(tiny(arch), tmp_path / "w8a8") if quantized else tiny(arch)
    s = Session("jax", model, dtype="float32", page_size=16)
    decoder, held = s.runner.decoder, s.runner.shard.experts
    spec = decoder.spec.moe
    assert gathers_experts(1, spec, held) and not gathers_experts(8, spec, held)
    layer = s.runner.weights["layers"][decoder.spec.num_layers - 1]  # an MoE layer
    down = layer["mlp.experts.down_proj.weight"]
    assert isinstance(down, Int8Weight) == quantized and (not quantized or str(down.q.dtype) == "int8")
    for tokens in (1, 8):
        x = jnp.asarray(torch.randn(tokens, decoder.spec.hidden_size).numpy())
        gathered, dense = (torch.from_dlpack(moe(spec, held, layer, x, gather)) for gather in (True, False))
        torch.testing.assert_close(gathered, dense, rtol=0, atol=1e-5)
    out = {}
    for dispatch in ("gather", "dense"):
        s = Session("jax", model, dtype="float32", page_size=16, options={"moe": dispatch})
        seqs = [s.new_sequence(p)[0] for p in PROMPTS]
        out[dispatch] = torch.cat([s.forward(seqs, PROMPTS), s.forward(seqs, [[1], [2], [3]])])
    # W8A8: a sum in another order may move an activation across a rounding edge (conformance's W8A8_TOLERANCE)
    torch.testing.assert_close(out["gather"], out["dense"], rtol=0, atol=5e-2 if quantized else 1e-4)


def test_a_tied_lm_head_is_kept_once(tmp_path):
    """A tied embedding is kept only as lm_head's transposed copy ([H, V], which the logits matmul
    wants); the embedding reads its columns, so the host's table is not held. Untied, both are
    kept."""
    import gc
    import weakref

    from sglang_fx.checkpoint import Checkpoint, load_spec
    from sglang_fx.tiny import make_tiny_model

    for arch, tied in (("qwen3", True), ("llama", False)):
        path = make_tiny_model(arch, tmp_path / arch)  # its own checkpoints: no other test's loads share them
        spec = load_spec(path, "float32")
        weights = Checkpoint(path).load(spec)
        assert (weights["lm_head.weight"] is weights["model.embed_tokens.weight"]) == tied  # the loader ties by identity
        table = weakref.ref(weights["model.embed_tokens.weight"])
        runner = load_backend("jax").runner(spec, weights, RunnerOptions("cpu", {}))
        del weights
        gc.collect()
        assert ("embed" not in runner.weights) == tied
        if tied:  # nothing holds the host's table (untied, JAX may alias it or copy an unaligned one)
            assert table() is None
