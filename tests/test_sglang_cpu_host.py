"""The sgl_kernel stand-in of sglang_fx.cpu_host: its torch kernels against plain loops."""

from __future__ import annotations

import importlib.machinery

import pytest
import torch

from sglang_fx import cpu_host


def test_copy_all_layer_kv_cache_cpu_moves_slots_in_every_buffer():
    bufs = [torch.randn(12, 2, 4), torch.randn(12, 2, 4), torch.randn(12, 3).to(torch.bfloat16)]
    expected = [b.clone() for b in bufs]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.dtype.itemsize for b in bufs])
    tgt, src = torch.tensor([1, 5, 11]), torch.tensor([5, 2, 1])  # slot 5 is read, then overwritten
    cpu_host.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, want in zip(bufs, expected):
        want[tgt] = want[src].clone()
        assert torch.equal(got, want)
    cpu_host.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt[:0], src[:0])  # nothing to move


def test_assign_req_to_token_pool_cpu_matches_a_loop():
    table = torch.zeros((4, 16), dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0, 3])
    start, end = torch.tensor([3, 0, 5]), torch.tensor([4, 2, 8])
    out_cache_loc = torch.tensor([40, 10, 11, 70, 71, 72])
    cpu_host.assign_req_to_token_pool_cpu(req_pool_indices, table, start, end, out_cache_loc, table.shape[1])
    want = torch.zeros_like(table)
    pt = 0
    for r, s, e in zip(req_pool_indices.tolist(), start.tolist(), end.tolist()):
        want[r, s:e] = out_cache_loc[pt : pt + e - s].to(torch.int32)
        pt += e - s
    assert torch.equal(table, want)


def test_stand_in_refuses_unknown_names_and_raises_for_import_only_ones():
    if importlib.machinery.PathFinder.find_spec("sgl_kernel") is not None:
        pytest.skip("a real sgl_kernel is installed")
    cpu_host.install()  # normally done at start-up by the .pth file
    import sgl_kernel

    assert getattr(sgl_kernel, "SGLANG_FX_STAND_IN", False)
    with pytest.raises(ImportError, match="cannot import name"):
        exec("from sgl_kernel import fused_add_rmsnorm")
    with pytest.raises(NotImplementedError, match="speculative decoding"):
        sgl_kernel.verify_tree_greedy_cpu()
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")  # SGLang's AMX probe stays False


def test_mooncake_import_preloads_the_system_libraries(monkeypatch):
    """The import hook loads libibverbs (system_libs.preload) before `mooncake` is imported."""
    calls = []
    monkeypatch.setattr(cpu_host._ImportHook, "fixes", {"mooncake": lambda: calls.append("preload")})
    hook = cpu_host._ImportHook()
    assert hook.find_spec("mooncake") is None and calls == ["preload"]  # then the normal finders import it
    assert hook.find_spec("mooncake") is None and calls == ["preload"]  # once per process
