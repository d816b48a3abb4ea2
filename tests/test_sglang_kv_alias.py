"""Every backend aliases SGLang's own KV pools, as SGLang allocates them on the CPU (the MHA pool's
K and V buffers, the MLA pool's latent buffer): same data pointers, and a write through the
backend's KVCache lands in SGLang's buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from sglang_fx.exchange import shares_memory  # noqa: E402
from sglang_fx.kv_pool import KVLayout  # noqa: E402
from sglang_fx.registry import default_registry  # noqa: E402

BACKENDS = [n for n in default_registry().names() if default_registry().info(n).unavailable is None]


def mha_pool():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(size=256, page_size=16, dtype=torch.float32, head_num=2, head_dim=16, layer_num=2,
                            device="cpu", enable_memory_saver=False, enable_alt_stream=False)  # fmt: skip


def mla_pool():
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    return MLATokenToKVPool(size=256, page_size=16, dtype=torch.float32, kv_lora_rank=24, qk_rope_head_dim=8,
                            layer_num=2, device="cpu", enable_memory_saver=False)  # fmt: skip


@pytest.mark.parametrize("make_pool", [mha_pool, mla_pool])
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_aliases_sglang_kv_pool(name, make_pool):
    from sglang_fx.sglang import compat

    pool = make_pool()
    backend = default_registry().load(name)
    k, v, page_size = compat.kv_buffers(pool)
    sglang_k, sglang_v = (pool.k_buffer, pool.v_buffer) if v is not None else (pool.kv_buffer, None)
    v_shape = None if v is None else tuple(v[0].shape[1:])
    layout = KVLayout(len(k), k[0].shape[0] // page_size, page_size, tuple(k[0].shape[1:]), v_shape, k[0].dtype)
    cache = backend.kv_cache(layout, k, v, "cpu")
    ex = backend.exchange("cpu")
    for layer in range(len(k)):
        assert ex.to_torch(cache.k(layer)).data_ptr() == sglang_k[layer].data_ptr()
        if v is not None:
            assert shares_memory(ex.to_torch(cache.v(layer)), sglang_v[layer])
    slots = torch.tensor([3, 17, 200])
    new_k = torch.randn(3, *layout.k_shape)
    new_v = None if v is None else torch.randn(3, *layout.v_shape)
    cache.write(1, ex.from_torch(slots), ex.from_torch(new_k), None if v is None else ex.from_torch(new_v))
    assert torch.equal(sglang_k[1][slots], new_k)
    if v is not None:
        assert torch.equal(sglang_v[1][slots], new_v)
    assert compat.kv_identity(pool)[1:] == (sglang_k[0].data_ptr(), 0 if v is None else sglang_v[0].data_ptr())
