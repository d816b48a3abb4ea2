"""The MindSpore backend: exchange aliasing, in-place KV writes, attention tiers, whole-model
logits and greedy decoding against Hugging Face transformers (float32 on CPU)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mindspore")

import mindspore as ms  # noqa: E402

from sglang_fx.errors import UnsupportedConfigError  # noqa: E402
from sglang_fx.exchange import shares_memory  # noqa: E402
from sglang_fx.generate import Session  # noqa: E402
from sglang_fx.kv_pool import KVLayout, PagedKVPool  # noqa: E402
from sglang_fx.metadata import ForwardMetadata  # noqa: E402
from sglang_fx.registry import load_backend  # noqa: E402
from sglang_fx.spi import AttentionSpec, RunnerOptions  # noqa: E402
from sglang_fx_mindspore import plugin  # noqa: E402
from sglang_fx_mindspore.attention import (  # noqa: E402
    DECODE,
    FLASH,
    GENERAL,
    MASK_VALUE,
    ONE_TOKEN,
    PAGED_EXTEND,
    QUERY_GROUPS,
    ascend_inputs,
    flash_causal_mask,
)
from sglang_fx_mindspore.runtime import PRIMITIVE_CACHE, Tier, choose_tier, limit_primitive_cache  # noqa: E402

ARCHS = ["qwen3", "qwen3_moe", "qwen2", "llama", "deepseek_v3"]


def npu_available() -> bool:
    try:
        return ms.device_context.ascend.is_available()
    except Exception:
        return False


needs_npu = pytest.mark.skipif(not npu_available(), reason="needs an Ascend NPU (MindSpore's fused kernels are Ascend-only)")


@pytest.fixture(scope="module")
def backend():
    return load_backend("mindspore")


@pytest.fixture(scope="module")
def ex(backend):
    return backend.exchange("cpu")


@pytest.fixture(scope="module")
def hf(tiny):
    """hf(arch) -> (checkpoint path, float32 transformers model)."""
    import transformers

    models = {}

    def get(arch: str):
        if arch not in models:
            path = tiny(arch)
            models[arch] = (path, transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
        return models[arch]

    return get


# --- backend info ----------------------------------------------------------------------------


def test_info_declares_no_bfloat16_on_cpu(backend):
    info = backend.info
    assert info.unavailable is None and info.framework_version == ms.__version__
    assert info.capabilities.dtypes["cpu"] == {"float32", "float16"}
    assert "bfloat16" in info.capabilities.dtypes["npu"]


def test_info_without_mindspore_is_unavailable_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mindspore", None)  # makes `import mindspore` raise
    info = plugin.sglang_fx_backend_info()
    assert info.capabilities is None and info.framework_version is None
    assert "pip install mindspore==2.10.0" in info.unavailable


def test_bfloat16_on_cpu_is_refused_with_the_fix(tiny):
    with pytest.raises(UnsupportedConfigError, match=r"dtype 'bfloat16' is not supported on cpu; use one of: float16, float32"):
        Session("mindspore", tiny("qwen3"), dtype="bfloat16")


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"mode": "graph"}, "mode 'graph' is not one of jit | pynative"),
        ({"compile": "yes"}, r"unknown option\(s\) \['compile'\]; it takes mode, decode_batches"),
        ({"decode_batches": "1,two"}, "decode_batches '1,two' is not a comma-separated list of positive batch sizes"),
        ({"decode_batches": "0,4"}, "decode_batches '0,4' is not"),
        ({"precompile": "3"}, "precompile '3' is not none, all, or a comma-separated list of decode batch sizes among 1,2,4,8,"),
        ({"precompile": "all", "mode": "pynative"}, "precompile 'all' needs mode jit"),
        ({"precompile": "1", "decode_batches": "none"}, r"among \(none: decode_batches is none\)"),
        ({"compile_cache": "/tmp/x"}, "compile_cache keeps the precompiled graphs; set precompile too"),
    ],
)
def test_bad_options_are_refused(tiny, extra, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        Session("mindspore", tiny("qwen3"), options=extra)


@pytest.mark.skipif(npu_available(), reason="checks a host without an NPU")
def test_device_this_mindspore_cannot_use_is_refused(backend):
    with pytest.raises(UnsupportedConfigError, match="MindSpore cannot run on 'npu:0' in this process"):
        backend.exchange("npu:0")
    backend.exchange("cpu").from_torch(torch.ones(2)).asnumpy()  # MindSpore still works on CPU


def test_cpu_kernels_get_a_small_onednn_primitive_cache(ex):
    """Decode shapes change every step with the context length: oneDNN's default cache (1024
    primitives, ~1 MB each on SmolLM2) only grows. The exchange for cpu set it small."""
    assert limit_primitive_cache() == PRIMITIVE_CACHE


def test_a_onednn_primitive_cache_the_user_chose_is_kept():
    code = ("from sglang_fx.registry import load_backend; from sglang_fx_mindspore.runtime import limit_primitive_cache; "
            "load_backend('mindspore').exchange('cpu'); print(limit_primitive_cache())")  # fmt: skip
    env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "8"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "8"


# --- exchange ----------------------------------------------------------------------------------


def test_exchange_shares_memory_both_ways(ex):
    t = torch.zeros(4, 3)
    x = ex.from_torch(t, copy=False)
    t[1, 2] = 7.0  # torch write, seen by MindSpore
    assert x.asnumpy()[1, 2] == 7.0
    x[2] = 5.0  # MindSpore in-place write, seen by torch
    assert t[2].tolist() == [5.0, 5.0, 5.0]

    y = ms.Tensor([1.0, 2.0, 3.0], ms.float32)
    u = ex.to_torch(y, copy=False)
    u[0] = 9.0
    assert y.asnumpy().tolist() == [9.0, 2.0, 3.0]
    y[2] = 4.0
    assert u.tolist() == [9.0, 2.0, 4.0]


def test_exchange_bfloat16_round_trip_aliases(ex):
    t = torch.randn(5, 7).bfloat16()
    x = ex.from_torch(t, copy=False)
    assert x.dtype == ms.bfloat16
    back = ex.to_torch(x, copy=False)
    assert back.dtype == torch.bfloat16 and shares_memory(back, t) and torch.equal(back, t)


def test_weights_are_parameters_over_the_loaded_memory(backend, tiny):
    """The runner's weights are Parameters (no per-call argument cost) that alias the tensors it
    was given where it uses them unchanged, such as the embedding: no second copy of the model."""
    from sglang_fx.checkpoint import Checkpoint, load_spec

    spec = load_spec(tiny("qwen3"))
    weights = Checkpoint(tiny("qwen3")).load(spec)
    runner = backend.runner(spec, weights, RunnerOptions("cpu"))
    embed = runner.weights[0]
    assert isinstance(embed, ms.Parameter)
    weights["model.embed_tokens.weight"][3, 5] = 42.0
    assert embed.asnumpy()[3, 5] == 42.0


def test_a_graph_output_reaches_torch_without_a_copy(ex):
    @ms.jit
    def double(x):
        return x * 2.0

    y = double(ms.Tensor([[1.0, 2.0], [3.0, 4.0]], ms.float32))
    t = ex.output_to_torch(y)
    assert t.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    t[0, 0] = 9.0  # written through torch, seen by MindSpore: one memory
    assert double(y).asnumpy()[0, 0] == 18.0
    del y
    for _ in range(5):  # MindSpore's memory pool must not hand t's memory to new outputs
        double(ms.Tensor([[5.0, 5.0], [5.0, 5.0]], ms.float32)).asnumpy()
    assert t.tolist() == [[9.0, 4.0], [6.0, 8.0]]


def test_exchange_copy_rules(ex):
    t = torch.arange(12.0).reshape(3, 4)
    assert not shares_memory(ex.to_torch(ex.from_torch(t, copy=True)), t)
    with pytest.raises(BufferError, match="not contiguous"):
        ex.from_torch(t.T, copy=False)
    assert ex.from_torch(t.T).asnumpy().tolist() == t.T.tolist()  # copy=None makes it contiguous
    x = ex.from_torch(t)
    assert not shares_memory(ex.to_torch(x, copy=True), t)


# --- KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_write_lands_in_place_in_host_buffers(backend, ex, dtype):
    layout = KVLayout(num_layers=2, num_pages=4, page_size=16, k_shape=(2, 8), v_shape=(2, 8), dtype=dtype)
    pool = PagedKVPool(layout)
    before = [b.data_ptr() for b in pool.k_buffers + pool.v_buffers]
    cache = backend.kv_cache(layout, pool.k_buffers, pool.v_buffers, "cpu")
    assert shares_memory(ex.to_torch(cache.k(1)), pool.k_buffers[1])
    slots = torch.tensor([37, 2, 60, 17])
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    cache.write(1, ex.from_torch(slots), ex.from_torch(k), ex.from_torch(v))
    assert [b.data_ptr() for b in pool.k_buffers + pool.v_buffers] == before
    assert torch.equal(pool.k_buffers[1][slots], k.to(dtype)) and torch.equal(pool.v_buffers[1][slots], v.to(dtype))
    others = torch.ones(layout.num_slots, dtype=torch.bool)
    others[slots] = False
    assert not pool.k_buffers[1][others].any() and not pool.k_buffers[0].any()


# --- attention ---------------------------------------------------------------------------------


def step_metadata(page_size: int, prefix: list[int], new: list[int]) -> ForwardMetadata:
    """Sequences with scattered pages: sequence b holds prefix[b] cached + new[b] new tokens."""
    pages_per_seq = -(-max(p + n for p, n in zip(prefix, new)) // page_size)
    order = torch.randperm(len(prefix) * pages_per_seq, generator=torch.Generator().manual_seed(0)).tolist()
    slots = []
    for b, (p, n) in enumerate(zip(prefix, new)):
        pages = order[b * pages_per_seq : (b + 1) * pages_per_seq]
        slots.append([pages[j // page_size] * page_size + j % page_size for j in range(p + n)])
    return ForwardMetadata.from_lists(token_slots=slots, prefix_lens=prefix, logits="all", page_size=page_size)


@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("prefix,new", [([0, 0, 0], [5, 1, 19]), ([17, 0, 130], [3, 9, 1]), ([40, 3, 140], [1, 1, 1])])
def test_portable_attention_matches_reference(backend, ex, page_size, prefix, new):
    from sglang_fx_reference_torch.attention import TorchPagedAttention
    from sglang_fx_reference_torch.kv_cache import TorchKVCache

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, scale=0.25)
    meta = step_metadata(page_size, prefix, new)
    pages = -(-int(meta.req_to_token.max() + 1) // page_size)
    layout = KVLayout(1, pages, page_size, (2, 16), (2, 16), torch.float32)
    torch.manual_seed(0)
    k_pool, v_pool = torch.randn(layout.num_slots, 2, 16), torch.randn(layout.num_slots, 2, 16)
    q, k, v = torch.randn(meta.num_tokens, 4, 16), torch.randn(meta.num_tokens, 2, 16), torch.randn(meta.num_tokens, 2, 16)

    ref_cache = TorchKVCache(layout, [k_pool.clone()], [v_pool.clone()])
    ref = TorchPagedAttention(spec)
    ref.plan(meta)
    expected = ref.forward(0, q, k, v, ref_cache)

    attn = backend.attention(spec, layout, "cpu")
    ms_k, ms_v = k_pool.clone(), v_pool.clone()
    cache = backend.kv_cache(layout, [ms_k], [ms_v], "cpu")
    attn.plan(meta)
    got = ex.to_torch(attn.forward(0, ex.from_torch(q), ex.from_torch(k), ex.from_torch(v), cache))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(ms_k, ref_cache.k(0)) and torch.equal(ms_v, ref_cache.v(0))


def test_tier_choice():
    def layout(page_size, dtype):
        return KVLayout(1, 4, page_size, (2, 16), (2, 16), dtype)

    assert choose_tier("cpu", layout(16, torch.float16), torch.float16) is Tier.PORTABLE
    assert choose_tier("npu:0", layout(128, torch.bfloat16), torch.bfloat16) is Tier.ASCEND
    assert choose_tier("npu:0", layout(16, torch.float32), torch.float32) is Tier.PORTABLE  # fused kernels: half only
    assert choose_tier("npu:0", layout(16, torch.float16), torch.float32) is Tier.PORTABLE
    assert choose_tier("npu:0", layout(1, torch.float16), torch.float16) is Tier.PORTABLE  # blocks of 16k tokens


def test_ascend_inputs_prefill_uses_flash_attention():
    meta = step_metadata(16, [0, 0], [5, 20])
    a = ascend_inputs(meta, torch.float16)
    assert a.variant == FLASH
    assert a.actual_seq_qlen.tolist() == [5, 25] and a.actual_seq_qlen.dtype == torch.int32
    assert torch.equal(a.slot_mapping, meta.out_cache_loc.int())
    mask = flash_causal_mask()
    assert mask.shape == (2048, 2048) and mask.dtype == torch.uint8
    assert mask[0, 1] == 1 and mask[1, 1] == 0 and mask[5, 0] == 0


def test_ascend_inputs_block_tables_follow_req_to_token():
    meta = step_metadata(16, [17, 40], [1, 1])
    a = ascend_inputs(meta, torch.bfloat16)
    assert a.variant == DECODE
    assert a.context_lens.tolist() == [18, 41] and a.q_seq_lens.tolist() == [1, 1]
    assert a.block_tables.shape == (2, 3) and a.block_tables.dtype == torch.int32
    for b, n in enumerate(meta.seq_lens_cpu):
        pages = (meta.req_to_token[b, :n] // 16).unique_consecutive().tolist()
        assert a.block_tables[b, : len(pages)].tolist() == pages
    assert a.block_tables[0, 2] == 0  # sequence 0 has 2 pages; the rest is padding


def test_ascend_inputs_for_latent_attention_never_use_flash_attention():
    meta = step_metadata(16, [0, 0], [5, 20])
    assert ascend_inputs(meta, torch.float16, flash=False).variant == PAGED_EXTEND
    assert ascend_inputs(step_metadata(16, [32, 16], [1, 1]), torch.float16, flash=False).variant == DECODE


def test_ascend_inputs_prefix_hit_uses_a_lookahead_mask():
    meta = step_metadata(16, [32, 0], [3, 2])
    a = ascend_inputs(meta, torch.float16)
    assert a.variant == PAGED_EXTEND and a.q_seq_lens.tolist() == [3, 2]
    assert a.lookahead_mask.shape == (5, 35) and a.lookahead_mask.dtype == torch.float16
    for t, pos in enumerate(meta.positions.tolist()):
        row = a.lookahead_mask[t]
        assert not row[: pos + 1].any() and (row[pos + 1 :] == MASK_VALUE).all()



def test_ascend_inputs_of_a_verify_step_mask_by_the_draft_tree():
    """A VERIFY step on Ascend runs paged_attention with a lookahead mask: each draft token sees
    its sequence's committed prefix and the draft tokens its tree-mask row allows, not what its
    position (prefix + tree depth) would allow."""
    trees = [[[1, 0, 0], [1, 1, 0], [1, 0, 1]], [[1, 0], [1, 1]]]  # a root with two children; a chain
    base = step_metadata(16, [32, 5], [3, 2])
    slots = [base.req_to_token[b, : base.seq_lens_cpu[b]].tolist() for b in range(2)]
    meta = ForwardMetadata.verify_step(token_slots=slots, prefix_lens=[32, 5], tree_masks=trees, page_size=16)
    a = ascend_inputs(meta, torch.float16)
    assert a.variant == PAGED_EXTEND and a.lookahead_mask.shape == (5, 35)
    seen = (a.lookahead_mask == 0).tolist()
    assert seen[2] == [True] * 32 + [True, False, True]  # the second child: prefix, root, itself
    assert seen[3] == [True] * 5 + [True, False] + [False] * 28 and seen[4][:7] == [True] * 7


ASCEND_SHAPE_CHECK = """
import sys
import mindspore as ms, torch
from sglang_fx.kv_pool import KVLayout, PagedKVPool
from sglang_fx.metadata import ForwardMetadata
from sglang_fx.spi import AttentionSpec
from sglang_fx_mindspore.attention import AscendPagedAttention
from sglang_fx_mindspore.exchange import MindSporeExchange
from sglang_fx_mindspore.kv_cache import MindSporeKVCache

ms.set_device("CPU")
ms.runtime.launch_blocking()  # report each kernel's error at its own call
ex = MindSporeExchange()
GQA = (AttentionSpec(4, 2, 128, 128, 128**-0.5), KVLayout(1, 8, 16, (2, 128), (2, 128), torch.float16))
MLA = (AttentionSpec(4, 1, 576, 512, 192**-0.5), KVLayout(1, 8, 16, (1, 576), None, torch.float16))  # DeepSeek-V3's dims
for spec, layout in (GQA, MLA):
    pool = PagedKVPool(layout)
    cache = MindSporeKVCache(layout, pool.k_buffers, pool.v_buffers, ex)
    attn = AscendPagedAttention(spec, layout, "cpu", ex)
    for prefix, new in [([0, 0], [5, 20]), ([32, 16], [1, 1]), ([32, 0], [3, 2])]:
        slots = [[b * 64 + j for j in range(p + n)] for b, (p, n) in enumerate(zip(prefix, new))]
        attn.plan(ForwardMetadata.from_lists(token_slots=slots, prefix_lens=prefix, page_size=16))
        q, k = (ex.from_torch(torch.randn(sum(new), h, spec.head_dim, dtype=torch.float16)) for h in (4, spec.num_kv_heads))
        v = None if layout.v_shape is None else ex.from_torch(torch.randn(sum(new), 2, 128, dtype=torch.float16))
        pages = (cache.key_pages[0], None if cache.value_pages is None else cache.value_pages[0])
        for call in (lambda: attn.store(k, v, *pages, attn.inputs), lambda: attn.attend(q, k, v, *pages, attn.inputs, attn.variant)):
            try:
                call().asnumpy()
            except RuntimeError as e:
                print(str(e).splitlines()[0])

# W8A8 on Ascend: QuantBatchMatmul with the arguments int8.ascend_linear builds (prefill and decode rows).
from sglang_fx_mindspore import int8
w = (ex.from_torch(torch.randint(-127, 128, (96, 64), dtype=torch.int8)), ex.from_torch(torch.rand(96)))
for T in (5, 1):
    try:
        int8.ascend_linear(ex.from_torch(torch.randn(T, 64, dtype=torch.float16)), w).asnumpy()
    except RuntimeError as e:
        print(str(e).splitlines()[0])

# The whole jit step with the Ascend tier: parsed and type-inferred, then refused at kernel selection.
from sglang_fx.generate import Session
from sglang_fx_mindspore import attention, runtime
attention.choose_tier = lambda device, layout, dtype: runtime.Tier.ASCEND
for path in sys.argv[1:]:
    s = Session("mindspore", path, dtype="float16", page_size=16)
    first = s.new_sequence(list(range(3, 40)))[0]
    for step in ("prefill", "decode", "prefix hit"):
        seqs, tokens = [first], [list(range(3, 40))] if step == "prefill" else [[7]]
        if step == "prefix hit":
            seqs, tokens = [s.new_sequence(list(range(3, 40)) + [9, 9])[0]], [[9, 9, 9]]
        try:
            s.forward(seqs, tokens)
        except RuntimeError as e:
            print(s.runner.attn.variant, next(line for line in str(e).splitlines() if "Unsupported op" in line).split(",")[0])
"""


@pytest.mark.skipif(npu_available(), reason="the NPU tests run the kernels themselves")
def test_ascend_kernels_accept_their_arguments(tmp_path, tiny):
    """MindSpore checks a primitive's argument shapes and dtypes (its infer function) before it
    looks for a kernel, so on CPU a well-formed call fails only for want of the Ascend kernel:
    each kernel alone in PyNative, for grouped-query and for latent attention, and the whole
    Ascend-tier step graph of both kinds of model under jit (run in a subprocess: it needs
    MindSpore's process-wide blocking launch). Latent attention never takes the FLASH path. W8A8:
    QuantBatchMatmul with the arguments `int8.ascend_linear` builds."""
    import subprocess

    script = tmp_path / "check.py"
    script.write_text(ASCEND_SHAPE_CHECK)
    models = [str(tiny("qwen3")), str(tiny("deepseek_v3"))]
    proc = subprocess.run([sys.executable, str(script), *models], capture_output=True, text=True, timeout=600)
    gqa = ["ReshapeAndCache", "FlashAttentionScore"] + ["ReshapeAndCache", "PagedAttention"] * 2
    mla = ["ReshapeAndCache", "PagedAttention"] * 3
    graphs = [(FLASH, DECODE, PAGED_EXTEND), (PAGED_EXTEND, DECODE, PAGED_EXTEND)]
    expected = [f"The kernel {name} unregistered." for name in gqa + mla + ["QuantBatchMatmul"] * 2]
    expected += [f"{variant} Unsupported op [ReshapeAndCache] on CPU" for variants in graphs for variant in variants]
    assert proc.stdout.splitlines() == expected, proc.stderr[-3000:]


@needs_npu
@pytest.mark.parametrize("prefix,new", [([0, 0], [5, 20]), ([32, 16], [1, 1]), ([32, 0], [3, 2])])
def test_ascend_attention_matches_reference(backend, prefix, new):
    pytest.importorskip("torch_npu")  # the host's KV pool lives in NPU memory
    from sglang_fx_reference_torch.attention import TorchPagedAttention
    from sglang_fx_reference_torch.kv_cache import TorchKVCache

    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_dim=128, v_head_dim=128, scale=128**-0.5)
    meta = step_metadata(16, prefix, new)
    layout = KVLayout(1, 8, 16, (2, 128), (2, 128), torch.float16)
    q, k, v = (torch.randn(meta.num_tokens, h, 128, dtype=torch.float16) for h in (4, 2, 2))
    ref = TorchPagedAttention(spec)
    ref.plan(meta)
    pool = PagedKVPool(layout)
    expected = ref.forward(0, q.float(), k.float(), v.float(), TorchKVCache(layout, pool.k_buffers, pool.v_buffers))

    ex = backend.exchange("npu:0")
    npu_pool = PagedKVPool(layout, "npu:0")
    cache = backend.kv_cache(layout, npu_pool.k_buffers, npu_pool.v_buffers, "npu:0")
    attn = backend.attention(spec, layout, "npu:0")
    attn.plan(ForwardMetadata(**{f: getattr(meta, f).to("npu:0") if isinstance(getattr(meta, f), torch.Tensor)
                                 else getattr(meta, f) for f in meta.__dataclass_fields__}))  # fmt: skip
    out = attn.forward(0, *(ex.from_torch(t.to("npu:0")) for t in (q, k, v)), cache)
    torch.testing.assert_close(ex.to_torch(out).float().cpu(), expected, rtol=0, atol=2e-3)


# --- whole model -------------------------------------------------------------------------------

PROMPT = [(37 * j + 11) % 500 + 3 for j in range(150)]


@pytest.mark.parametrize("page_size", [1, 16, 128])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers_with_prefix_hits(hf, arch, page_size):
    path, model = hf(arch)
    s = Session("mindspore", path, page_size=page_size, max_total_tokens=1024)

    def expected(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0]

    first, _ = s.new_sequence(PROMPT)
    got = s.forward([first], [PROMPT], logits="all")
    assert s.runner.attn.variant == GENERAL and len(s.runner.attn.inputs) == 3 * QUERY_GROUPS + 1  # query groups, jit
    worst = (got - expected(PROMPT)).abs().max().item()

    hit = PROMPT[:140] + [7, 8, 9, 10, 11, 12]  # shares 140 (page 1) or 128 (pages 16/128) tokens
    fresh = PROMPT[20:31]
    second, shared = s.new_sequence(hit)
    third, _ = s.new_sequence(fresh)
    assert shared == {1: 140, 16: 128, 128: 128}[page_size]
    got = s.forward([second, third], [hit[shared:], fresh], logits="all")  # ragged: prefix hit + fresh
    worst = max(worst, (got[: len(hit) - shared] - expected(hit)[shared:]).abs().max().item())
    worst = max(worst, (got[len(hit) - shared :] - expected(fresh)).abs().max().item())

    got = s.forward([second, third], [[42], [43]])  # decode over the shared pages
    worst = max(worst, (got[0] - expected(hit + [42])[-1]).abs().max().item())
    worst = max(worst, (got[1] - expected(fresh + [43])[-1]).abs().max().item())
    assert worst < 1e-4, f"{arch} page {page_size}: max abs logit diff {worst:.3g}"


def test_deepseek_without_q_lora_and_with_plain_rope_matches_transformers(tiny):
    """The DeepSeek variants the tiny preset does not take: a plain q_proj (q_lora_rank None,
    as DeepSeek-V2-Lite) and RoPE over the two halves (rope_interleave False)."""
    import transformers

    path = tiny("deepseek_v3", q_lora_rank=None, rope_interleave=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    s = Session("mindspore", path, page_size=16)
    seq = s.new_sequence(PROMPT[:40])[0]
    got = s.forward([seq], [PROMPT[:40]], logits="all")
    with torch.no_grad():
        want = model(torch.tensor([PROMPT[:40]])).logits[0]
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_steps_match_transformers(hf, arch):
    path, model = hf(arch)
    prompts = [PROMPT[:23], PROMPT[50:53], PROMPT[7:47], [5]]
    got = Session("mindspore", path, page_size=16).generate(prompts, 32)
    for prompt, tokens in zip(prompts, got):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens == want[0, len(prompt) :].tolist()


def test_pynative_mode_gives_the_jit_logits(tiny):
    prompts = [PROMPT[:30], PROMPT[40:45]]
    out = []
    for mode in ("pynative", "jit"):
        s = Session("mindspore", tiny("qwen2"), page_size=16, options={"mode": mode})
        seqs = [s.new_sequence(p)[0] for p in prompts]
        first = s.forward(seqs, prompts, logits="all")
        out.append(torch.cat([first, s.forward(seqs, [[3], [4]])]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)


def test_mindspores_compile_cache_switch_is_refused(tiny, monkeypatch):
    """MindSpore's own persistent compile cache loads this backend's graphs with wrong weights
    (every greedy token 0 on a warm cache, measured): the runner refuses to start under it."""
    monkeypatch.setenv("MS_COMPILER_CACHE_ENABLE", "1")
    with pytest.raises(UnsupportedConfigError, match="MS_COMPILER_CACHE_ENABLE=1 is set.*unset it.*precompile"):
        Session("mindspore", tiny("qwen3"))


@pytest.mark.parametrize("arch,page_size", [("qwen3", 16), ("qwen3", 1), ("qwen3_moe", 16)])
def test_precompile_compiles_before_the_first_step_and_changes_no_token(tiny, caplog, arch, page_size):
    prompts = [PROMPT[:30], PROMPT[40:45], PROMPT[7:9]]
    plain = Session("mindspore", tiny(arch), page_size=page_size).generate(prompts, 8)
    ahead = Session("mindspore", tiny(arch), page_size=page_size, options={"precompile": "1,4"})
    with caplog.at_level(logging.INFO, logger="sglang_fx_mindspore.model"):
        first = ahead.generate(prompts[:1], 8)
    compiled = [r.getMessage().split(" graph compiled in")[0] for r in caplog.records if "graph compiled in" in r.getMessage()]
    want = ["prefill"] + (["prefill (dense experts)"] if arch == "qwen3_moe" else [])
    assert compiled == [f"sglang-fx mindspore: {label}" for label in want + ["decode batch 1", "decode batch 4"]]
    graphs = [(1, ONE_TOKEN), (4, ONE_TOKEN), (None, GENERAL)]  # one graph for every multi-token step
    assert sorted(ahead.runner._graphs, key=str) == sorted(graphs, key=str)
    rest = ahead.generate(prompts, 8)  # batch 3 runs the batch-4 graph: no new graph
    assert sorted(ahead.runner._graphs, key=str) == sorted(graphs, key=str)
    assert first == plain[:1] and rest == plain


CACHED_RUN = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from sglang_fx.generate import Session
options = {"precompile": "1,4", "compile_cache": sys.argv[2]} if sys.argv[2] != "none" else {}
s = Session("mindspore", sys.argv[1], page_size=16, options=options)
out = s.generate([list(range(5, 35)), [7, 8, 9]], 8) + s.generate([[40, 41], [42], [43, 44, 45]], 6)
print("RESULT", json.dumps({"tokens": out, "enabled": os.environ.get("MS_COMPILER_CACHE_ENABLE")}))
"""


def test_compile_cache_gives_a_restarted_process_the_same_graphs(tiny, tmp_path):
    """Two processes with compile_cache: the first compiles and stores the precompiled graphs
    (cold), the second loads them (warm); both give the tokens of a run without the cache, and
    MindSpore's cache is off again after the precompile."""
    script = tmp_path / "run.py"  # MindSpore's cache needs the program to be a file
    script.write_text(CACHED_RUN)
    model, cache = str(tiny("qwen3")), str(tmp_path / "cache")

    def run(cache_dir):
        out = subprocess.run([sys.executable, str(script), model, cache_dir], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "GLOG_v": "3"})  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.split("RESULT ", 1)[1])
        states = re.findall(r"graph compiled in [0-9.]+ s \(compile cache: (\w+)\)", out.stderr)
        return result, states

    plain, _ = run("none")
    cold, cold_states = run(cache)
    warm, warm_states = run(cache)
    # prefill, decode batch 1 and 4
    assert cold_states == ["cold"] * 3 and warm_states == ["warm"] * 3, (cold_states, warm_states)
    assert cold["tokens"] == warm["tokens"] == plain["tokens"]
    assert cold["enabled"] == warm["enabled"] == "0"


def test_float16_on_cpu_matches_the_reference_backend(tiny):
    prompts = [PROMPT[:30], PROMPT[40:45]]
    out = []
    for name in ("mindspore", "reference_torch"):
        s = Session(name, tiny("llama"), dtype="float16", page_size=16)
        seqs = [s.new_sequence(p)[0] for p in prompts]
        out.append(s.forward(seqs, prompts, logits="all"))
    assert out[0].dtype == torch.float32
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=2e-2)


MOE_WITH_DENSE_LAYERS = {
    "qwen3_moe": dict(num_hidden_layers=3, decoder_sparse_step=2),  # dense, MoE, dense
    "deepseek_v3": dict(num_hidden_layers=3, first_k_dense_replace=1),  # dense, MoE, MoE
}


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-4), ("float16", 2e-2)])
@pytest.mark.parametrize("arch", MOE_WITH_DENSE_LAYERS)
def test_moe_with_dense_layers_matches_the_reference_backend(tiny, arch, dtype, atol):
    path = tiny(arch, **MOE_WITH_DENSE_LAYERS[arch])
    prompts = [PROMPT[:30], PROMPT[40:45]]
    out = []
    for name in ("mindspore", "reference_torch"):
        s = Session(name, path, dtype=dtype, page_size=16)
        seqs = [s.new_sequence(p)[0] for p in prompts]
        first = s.forward(seqs, prompts, logits="all")
        out.append(torch.cat([first, s.forward(seqs, [[3], [4]])]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=atol)


@pytest.mark.parametrize("arch", MOE_WITH_DENSE_LAYERS)
def test_moe_gathered_and_dense_expert_compute_agree(tiny, ex, arch):
    """The two ways `layers.moe` computes (each token's k experts gathered; every expert, weighted
    by zero where unchosen) give the same outputs, shared experts included."""
    from sglang_fx.checkpoint import Checkpoint, load_spec
    from sglang_fx_mindspore.layers import gathers_experts, moe, moe_weights

    spec = load_spec(tiny(arch))
    m = spec.moe
    weights = tuple(ex.from_torch(t) for t in moe_weights(Checkpoint(tiny(arch)).load(spec), "model.layers.1.mlp.", m))
    assert gathers_experts(1, m) and not gathers_experts(m.num_experts // m.top_k, m)
    for tokens in (1, 3, 40):
        x = ex.from_torch(torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(tokens)))
        gathered, dense = (ex.to_torch(moe(x, weights, m, gather)) for gather in (True, False))
        torch.testing.assert_close(gathered, dense, rtol=0, atol=1e-5)
        assert dense.abs().max() > 1e-2  # not trivially zero


def test_every_architecture_declared_has_a_model():
    from sglang_fx_mindspore.model import ARCHITECTURES

    assert set(ARCHITECTURES) == plugin.CAPABILITIES.architectures


def test_an_architecture_without_a_model_is_refused(tiny):
    import dataclasses

    from sglang_fx.checkpoint import load_spec
    from sglang_fx_mindspore.exchange import MindSporeExchange
    from sglang_fx_mindspore.model import MindSporeRunner

    spec = dataclasses.replace(load_spec(tiny("qwen3")), architecture="MistralForCausalLM")
    with pytest.raises(UnsupportedConfigError, match="architecture 'MistralForCausalLM' is not supported; it runs Qwen3ForCausalLM"):
        MindSporeRunner(spec, {}, RunnerOptions("cpu"), MindSporeExchange())


@pytest.mark.parametrize("decode_batches", [None, "none"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "deepseek_v3"])
def test_jit_compiles_once_per_path_and_decode_batch(tiny, arch, decode_batches):
    """The step compiles one graph per path it can take and per decode batch size it uses, never
    per shape. The dynamic graph: a prefill (general attention); without decode batches also a
    decode (one-token attention), and for MoE models one small enough to gather experts (batch 1)
    and one that runs them densely (batch 4). With them (the default), each decode batch size
    compiles once when first used. After those, new batch sizes, lengths and prefix hits reuse
    the graphs."""
    from mindspore.graph.api import ms_compile_cache  # MindSpore's set of compiled graph phases

    s = Session("mindspore", tiny(arch), page_size=16, options={} if decode_batches is None else {"decode_batches": decode_batches})
    warm = [s.new_sequence(PROMPT[40 + i : 49 + i])[0] for i in range(4)]
    s.forward(warm, [PROMPT[40 + i : 49 + i] for i in range(4)])
    s.forward(warm[:1], [[3]])
    s.forward(warm, [[3]] * 4)
    compiled = len(ms_compile_cache)
    seqs = [s.new_sequence(PROMPT[i : i + 5 + 3 * i])[0] for i in range(3)]
    s.forward(seqs, [PROMPT[i : i + 5 + 3 * i] for i in range(3)])  # new batch size, lengths, prefix hit
    s.forward(seqs, [[5]] * 3)  # decode batch 3: in batch 4's graph
    assert len(ms_compile_cache) == compiled
    s.forward([*warm, *seqs], [[6]] * 7)  # decode batch 7: batch 8's graph, new
    compiled += 1 if decode_batches is None else 0
    assert len(ms_compile_cache) == compiled
    for step in range(3):
        s.forward([*warm, *seqs][: 5 + step], [[step]] * (5 + step))
        s.forward(seqs, [[step]] * 3)
        s.forward(seqs[:1], [[step]])
    assert len(ms_compile_cache) == compiled


def test_padded_decode_gives_the_unpadded_logits(tiny):
    """A decode step of 3 sequences run in the batch-4 graph (the last sequence repeated) gives
    the logits, and leaves the KV pool, as the dynamic graph does."""
    prompts = [PROMPT[:20], PROMPT[30:37], PROMPT[50:61]]
    logits, pools = [], []
    for batches in ("4", "none"):
        s = Session("mindspore", tiny("qwen3"), page_size=16, options={"decode_batches": batches})
        seqs = [s.new_sequence(p)[0] for p in prompts]
        s.forward(seqs, prompts)
        steps = [s.forward(seqs, [[7 + i], [8 + i], [9 + i]]) for i in range(3)]
        logits.append(torch.cat(steps))
        pools.append(torch.cat([b.flatten() for b in s.pool.k_buffers + s.pool.v_buffers]))
    assert logits[0].shape == (9, logits[0].shape[1])
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(pools[0], pools[1], rtol=0, atol=1e-5)


# --- large extend steps: split into pieces (linear attention memory) ----------------------------


def test_split_runs_every_token_once_in_order_within_the_limit():
    from sglang_fx_mindspore.pieces import attention_scores, split

    meta = ForwardMetadata.from_lists(token_slots=[list(range(100, 140)), list(range(5)), list(range(200, 290))],
                                      prefix_lens=[10, 0, 30], logits="all")  # fmt: skip
    ids = torch.arange(meta.num_tokens) + 1000
    heads, limit = 2, 2 * 20 * 60
    pieces = split(meta, ids, heads, limit)
    assert len(pieces) > 3
    assert torch.equal(torch.cat([p.input_ids for p in pieces]), ids)  # every token once, in order
    assert torch.equal(torch.cat([p.meta.out_cache_loc for p in pieces]), meta.out_cache_loc)
    assert torch.equal(torch.cat([p.meta.positions for p in pieces]), meta.positions)
    assert torch.equal(torch.cat([p.logits_rows for p in pieces]), torch.arange(meta.num_tokens))
    for p in pieces:
        m = p.meta
        assert attention_scores(m, heads) <= limit
        assert all(s == a + e for s, a, e in zip(m.seq_lens_cpu, m.prefix_lens_cpu, m.extend_lens_cpu))
        assert torch.equal(m.positions, torch.cat([torch.arange(a, s) for a, s in zip(m.prefix_lens_cpu, m.seq_lens_cpu)]))
        for b, s in enumerate(m.seq_lens_cpu):  # each piece's sequence reads its own slots: its row of the step
            assert any(torch.equal(m.req_to_token[b, :s], row[:s]) for row in meta.req_to_token)
    last = split(ForwardMetadata.from_lists(token_slots=[list(range(50))] * 1, prefix_lens=[0]), ids[:50], heads, 200)
    assert [len(p.logits_rows) for p in last] == [0] * (len(last) - 1) + [1]  # only the last chunk's logit is wanted
    assert all(len(p.meta.logits_indices) == 1 for p in last)  # the others compute one, dropped
    whole = split(meta, ids, heads, attention_scores(meta, heads))
    assert len(whole) == 1 and whole[0].meta is meta
    # a ragged step: the short prompts beside the long one would pad to 512 x 512 scores each
    ragged = ForwardMetadata.from_lists(token_slots=[list(range(512)), *[list(range(600 + 20 * i, 616 + 20 * i)) for i in range(3)]],
                                        prefix_lens=[0] * 4)  # fmt: skip
    pieces = split(ragged, torch.arange(ragged.num_tokens), 9, 1 << 30)
    assert [p.meta.extend_lens_cpu for p in pieces] == [(512,), (16, 16, 16)]


def test_a_step_split_into_pieces_gives_the_whole_steps_logits_and_pool(tiny):
    """A ragged step with prefix hits, run whole and as pieces of at most 3000 score values (down
    to chunks of a few tokens): the same logits for every token and the same KV pool."""
    logits, pools = [], []
    for extra in ({}, {"attention_scores": "3000"}):
        s = Session("mindspore", tiny("qwen3"), page_size=16, options=extra)
        seqs = [s.new_sequence(p)[0] for p in (PROMPT[:5], PROMPT[:40], PROMPT[60:67])]
        first = s.forward(seqs[:2], [PROMPT[:5], PROMPT[:40]])
        second = s.forward(seqs, [[4] * 3, PROMPT[40:70], PROMPT[60:67]], logits="all")
        logits.append(torch.cat([first, second, s.forward(seqs, [[5], [6], [7]])]))
        pools.append(torch.cat([b.flatten() for b in s.pool.k_buffers + s.pool.v_buffers]))
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(pools[0], pools[1], rtol=0, atol=1e-5)


ATTENTION_MEMORY = """
import json, sys
from sglang_fx.generate import Session

def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

s = Session("mindspore", sys.argv[1], page_size=16, max_total_tokens=8192 + 128, options=json.loads(sys.argv[2]))
warm = s.new_sequence(list(range(3, 67)))[0]
s.forward([warm], [list(range(3, 67))])  # compiles the graph; the pool and weights are in place
s.release(warm)
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
base = kib("VmRSS")
prompt = [(37 * j + 11) % 500 + 3 for j in range(8192)]
seq = s.new_sequence(prompt)[0]
logits = s.forward([seq], [prompt])
print(json.dumps({"growth_mb": (kib("VmHWM") - base) / 1024, "finite": bool(logits.isfinite().all())}))
"""


def test_an_8k_token_prompts_attention_memory_is_linear(tiny, tmp_path):
    """An 8192-token prompt in one step on a tiny model whose context holds it: the process's
    peak RSS grows by at most 300 MB over what weights, pool and graph took. Unsplit, its
    [1, Hkv, 8192 * G, 8192] scores alone are 1 GiB per tensor (4 heads)."""
    script = tmp_path / "attention_memory.py"
    script.write_text(ATTENTION_MEMORY)
    out = subprocess.run([sys.executable, str(script), str(tiny("llama", max_position_embeddings=8192)), "{}"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["finite"] and got["growth_mb"] <= 300, got


# ---------------------------------------------------------------------------------------------
# W8A8 int8 (int8.py)
# ---------------------------------------------------------------------------------------------


def test_int8_quantize_is_the_rule_bit_for_bit(ex):
    """`int8.quantize` gives sglang_fx.quant's q and scale exactly, op by op and under jit, on
    exact halves (MindSpore's Round rounds them to even), an all-zero row and an outlier."""
    import numpy as np

    from sglang_fx.quant import quantize_activations
    from sglang_fx_mindspore import int8

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 6)[:, None]
    x[0] = 0
    x[1, 3] = 1e3
    x[2, :5] = torch.tensor([127.0, 0.5, 1.5, -2.5, 2.5])  # absmax 127: scale 1, so x / scale hits the halves
    x[2, 5:] = 0
    q_ref, s_ref = quantize_activations(x.numpy())
    assert q_ref[2, :5].tolist() == [127, 0, 2, -2, 2]
    for fn in (int8.quantize, ms.jit(int8.quantize)):
        q, s = fn(ex.from_torch(x))
        assert np.array_equal(q.asnumpy(), q_ref) and q.dtype == ms.int8
        assert np.array_equal(s.asnumpy(), s_ref)


@pytest.mark.parametrize("arch", MOE_WITH_DENSE_LAYERS)
def test_int8_experts_gathered_and_dense_agree(tiny, tmp_path, arch):
    """The two ways `layers.moe` computes quantized experts agree (their integer products are the
    same per (token, expert); only the sum over experts differs in order), shared experts included."""
    from sglang_fx.checkpoint import Checkpoint, load_spec
    from sglang_fx.quantize import quantize
    from sglang_fx_mindspore.exchange import MindSporeExchange
    from sglang_fx_mindspore.layers import moe, moe_weights

    path = quantize(tiny(arch), tmp_path / "w8a8")
    spec = load_spec(path)
    m, ex = spec.moe, MindSporeExchange()
    place = lambda t: tuple(place(x) for x in t) if isinstance(t, tuple) else ex.from_torch(t)  # noqa: E731
    weights = place(moe_weights(Checkpoint(path).load(spec), "model.layers.1.mlp.", m, quant=spec.quant))
    assert weights[2][0].dtype == ms.int8 and weights[3][0].dtype == ms.int8  # gate_up, down: (int8, scale) pairs
    for tokens in (1, 3, 40):
        x = ex.from_torch(torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(tokens)))
        gathered, dense = (ex.to_torch(moe(x, weights, m, gather)) for gather in (True, False))
        torch.testing.assert_close(gathered, dense, rtol=0, atol=1e-5)
        assert dense.abs().max() > 1e-2  # not trivially zero


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_w8a8_pynative_gives_the_jit_logits(tiny, tmp_path, arch):
    """A quantized model (its norms unfolded, its projections (int8, scale) pairs) computes the
    same logits op by op as in its compiled graphs."""
    from sglang_fx.quantize import quantize

    path = quantize(tiny(arch), tmp_path / "w8a8")
    out = []
    for mode in ("jit", "pynative"):
        s = Session("mindspore", path, dtype="float32", page_size=16, options={"mode": mode})
        seqs = [s.new_sequence(p)[0] for p in (PROMPT[:30], PROMPT[40:45])]
        out.append(torch.cat([s.forward(seqs, [PROMPT[:30], PROMPT[40:45]], logits="all"), s.forward(seqs, [[3], [4]])]))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-5)
