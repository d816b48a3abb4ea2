"""Every backend aliases SGLang's own KV pool (MHATokenToKVPool, as SGLang allocates it on the
CPU): same data pointers, and a write through the backend's KVCache lands in SGLang's buffers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("sglang")

from sglang_fx.exchange import shares_memory  # noqa: E402
from sglang_fx.kv_pool import KVLayout  # noqa: E402
from sglang_fx.registry import default_registry  # noqa: E402

BACKENDS = [n for n in default_registry().names() if default_registry().info(n).unavailable is None]


@pytest.fixture(scope="module")
def sglang_pool():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(size=256, page_size=16, dtype=torch.float32, head_num=2, head_dim=16, layer_num=2,
                            device="cpu", enable_memory_saver=False, enable_alt_stream=False)  # fmt: skip


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_aliases_sglang_kv_pool(name, sglang_pool):
    from sglang_fx.sglang import compat

    backend = default_registry().load(name)
    k, v, page_size = compat.kv_buffers(sglang_pool)
    layout = KVLayout(len(k), k[0].shape[0] // page_size, page_size, tuple(k[0].shape[1:]), tuple(v[0].shape[1:]), k[0].dtype)
    cache = backend.kv_cache(layout, k, v, "cpu")
    ex = backend.exchange("cpu")
    for layer in range(len(k)):
        assert ex.to_torch(cache.k(layer)).data_ptr() == sglang_pool.k_buffer[layer].data_ptr()
        assert shares_memory(ex.to_torch(cache.v(layer)), sglang_pool.v_buffer[layer])
    slots = torch.tensor([3, 17, 200])
    new_k, new_v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    cache.write(1, ex.from_torch(slots), ex.from_torch(new_k), ex.from_torch(new_v))
    assert torch.equal(sglang_pool.k_buffer[1][slots], new_k) and torch.equal(sglang_pool.v_buffer[1][slots], new_v)
