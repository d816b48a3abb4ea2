"""sglang_fx.cpu_host: the sgl_kernel stand-in's torch kernels against plain loops, and the start-up
import hook (fixes before an import, actions after one, the .pth file)."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

import pytest
import torch

from sglang_fx import cpu_host
from sglang_fx.conformance.cases import tree_mask  # row i: node i and its ancestors


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
    with pytest.raises(NotImplementedError, match="multi-layer EAGLE speculative decoding"):
        sgl_kernel.rotate_input_ids_cpu()
    assert sgl_kernel.build_tree_kernel_efficient_cpu is cpu_host.build_tree_kernel_efficient_cpu
    from sgl_kernel.speculative import reconstruct_indices_from_tree_mask  # NGRAM's import

    assert reconstruct_indices_from_tree_mask is cpu_host.reconstruct_indices_from_tree_mask
    with pytest.raises(ImportError):
        exec("import sgl_kernel.flash_attn")
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")  # SGLang's AMX probe stays False


def test_mooncake_import_preloads_the_system_libraries(monkeypatch):
    """The import hook loads libibverbs (system_libs.preload) before `mooncake` is imported."""
    calls = []
    monkeypatch.setattr(cpu_host._ImportHook, "fixes", {"mooncake": lambda: calls.append("preload")})
    hook = cpu_host._ImportHook()
    assert hook.find_spec("mooncake") is None and calls == ["preload"]  # then the normal finders import it
    assert hook.find_spec("mooncake") is None and calls == ["preload"]  # once per process


def test_an_after_import_action_runs_once_the_module_has_loaded(tmp_path, monkeypatch):
    """`after`: the chooser runs before the module is found; its action, when it returns one,
    runs with the module once its code has run (how SGLang's one_batch gets its plugins)."""
    (tmp_path / "fx_after_probe.py").write_text("VALUE = 42\n")
    (tmp_path / "fx_after_plain.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = cpu_host._ImportHook()
    monkeypatch.setattr(hook, "after", {"fx_after_probe": lambda: lambda m: seen.append(m.VALUE), "fx_after_plain": lambda: None})
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    for name in ("fx_after_probe", "fx_after_plain"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import fx_after_plain
    import fx_after_probe

    assert seen == [42]
    assert fx_after_probe.__loader__.get_source("fx_after_probe") == "VALUE = 42\n"  # the module's own loader answers
    assert fx_after_plain.VALUE == 7 and not isinstance(fx_after_plain.__loader__, cpu_host._ThenRun)
    for name in ("fx_after_probe", "fx_after_plain"):
        del sys.modules[name]


def test_only_sglangs_own_one_batch_gets_the_plugins_from_the_hook(monkeypatch):
    """The chooser answers an action in a process whose main module, or multiprocessing's
    __mp_main__ (a spawned tensor-parallel rank), is SGLang's one_batch; nothing elsewhere."""
    import types

    from sglang_fx.sglang import bench_one_batch

    one_batch = importlib.machinery.ModuleSpec("sglang.benchmark.one_batch", None)
    assert cpu_host.sglang_one_batch_plugins() is None  # pytest's process
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", one_batch)  # python -m sglang.benchmark.one_batch
    assert cpu_host.sglang_one_batch_plugins() is bench_one_batch.load_plugins_with_the_model_runner
    monkeypatch.undo()
    assert cpu_host.sglang_one_batch_plugins() is None
    rank_main = types.ModuleType("__mp_main__")
    rank_main.__spec__ = one_batch
    monkeypatch.setitem(sys.modules, "__mp_main__", rank_main)  # a rank it spawned
    assert cpu_host.sglang_one_batch_plugins() is bench_one_batch.load_plugins_with_the_model_runner


def test_setup_cpu_host_writes_the_pth_file_the_wheel_ships(tmp_path):
    shipped = Path(cpu_host.__file__).with_name(cpu_host.PTH_NAME).read_text()
    assert shipped == "import sglang_fx.cpu_host as m; m.install()\n"
    assert cpu_host.write_pth(tmp_path).read_text() == shipped


# Speculative decoding: hand-worked trees. Node order is breadth-first; parents per request:
#   request 0: [-1, 0, 0, 1, 2, 3]   0 -> {1, 2}, 1 -> 3, 2 -> 4, 3 -> 5
#   request 1: [-1, 0, 0, 0, 1, 1]   0 -> {1, 2, 3}, 1 -> {4, 5}
#   request 2: [-1, 0, 1, 2, 3, 4]   a chain
TREES = [[-1, 0, 0, 1, 2, 3], [-1, 0, 0, 0, 1, 1], [-1, 0, 1, 2, 3, 4]]


def test_reconstruct_indices_from_tree_mask_hand_worked():
    mask = torch.tensor([tree_mask(p) for p in TREES], dtype=torch.bool).flatten()
    positions = torch.zeros(18, dtype=torch.int64)
    index, next_token, next_sibling = (torch.zeros((3, 6), dtype=torch.int64) for _ in range(3))
    cpu_host.reconstruct_indices_from_tree_mask(mask, torch.tensor([10, 3, 0]), positions, index, next_token, next_sibling, 3, 6)
    assert positions.tolist() == [10, 11, 11, 12, 12, 13] + [3, 4, 4, 4, 5, 5] + [0, 1, 2, 3, 4, 5]
    assert index.tolist() == [list(range(6)), list(range(6, 12)), list(range(12, 18))]
    assert next_token.tolist() == [[1, 3, 4, 5, -1, -1], [1, 4, -1, -1, -1, -1], [1, 2, 3, 4, 5, -1]]
    assert next_sibling.tolist() == [[-1, 2, -1, -1, -1, -1], [-1, 2, 3, -1, 5, -1], [-1] * 6]


def test_verify_tree_greedy_cpu_hand_worked():
    mask = torch.tensor([tree_mask(p) for p in TREES], dtype=torch.bool).flatten()
    index, next_token, next_sibling = (torch.zeros((3, 6), dtype=torch.int64) for _ in range(3))
    cpu_host.reconstruct_indices_from_tree_mask(mask, torch.zeros(3), torch.zeros(18, dtype=torch.int64), index, next_token,
                                                next_sibling, 3, 6)  # fmt: skip
    candidates = torch.tensor([[50, 7, 8, 9, 10, 11], [50, 5, 6, 7, 8, 9], [50, 1, 2, 3, 4, 5]])
    # The target's argmax after each node. Request 0: after the root it wants 8 (node 2, the
    # second child), after node 2 it wants 10 (node 4, a leaf), then 42 is the bonus token.
    # Request 1: it wants 99 after the root, no draft matches. Request 2: the chain matches all
    # along, and accept_index (4 wide) stops it after 3 accepted drafts, bonus 4.
    target = torch.tensor([[8, 0, 10, 0, 42, 0], [99, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    predicts = torch.full((18,), -7, dtype=torch.int32)
    accept_index = torch.full((3, 4), -1, dtype=torch.int32)
    accepted = torch.zeros(3, dtype=torch.int32)
    cpu_host.verify_tree_greedy_cpu(predicts=predicts, accept_index=accept_index, accept_token_num=accepted,
                                    candidates=candidates, retrive_index=index, retrive_next_token=next_token,
                                    retrive_next_sibling=next_sibling, target_predict=target)  # fmt: skip
    assert accepted.tolist() == [2, 0, 3]
    assert accept_index.tolist() == [[0, 2, 4, -1], [6, -1, -1, -1], [12, 13, 14, 15]]
    want = [-7] * 18
    want[0], want[2], want[4], want[6], want[12], want[13], want[14], want[15] = 8, 10, 42, 99, 1, 2, 3, 4
    assert predicts.tolist() == want


def test_assign_extend_cache_locs_cpu_reads_the_table():
    table = torch.arange(40, dtype=torch.int32).view(4, 10) + 100
    out = torch.full((5,), -1, dtype=torch.int64)
    cpu_host.assign_extend_cache_locs_cpu(torch.tensor([2, 0]), table, torch.tensor([3, 7]), torch.tensor([5, 10]), out, 10)
    assert out.tolist() == [123, 124, 107, 108, 109]


def test_fill_accept_out_cache_loc_and_bonus_tokens_cpu():
    accept_index = torch.tensor([[0, 2, 4, -1], [6, -1, -1, -1], [12, 13, 14, 15]], dtype=torch.int32)
    out_cache_loc = torch.arange(18, dtype=torch.int64) * 10 + 1
    packed = torch.full((10,), -1, dtype=torch.int64)
    cpu_host.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, packed)
    assert packed.tolist() == [1, 21, 41, 61, 121, 131, 141, 151, -1, -1]
    tokens = torch.tensor([[8, 10, 42, 0], [99, 0, 0, 0], [1, 2, 3, 4]])
    bonus = torch.zeros(3, dtype=torch.int64)
    cpu_host.fill_bonus_tokens_cpu(tokens.flatten(), torch.tensor([3, 1, 4]), bonus, 4)
    assert bonus.tolist() == [42, 99, 4]


# Drafting with a draft model (STANDALONE): the draft steps' slots and the verify tree.


def test_assign_draft_cache_locs_contiguous_cpu_matches_a_loop():
    table = torch.arange(60, dtype=torch.int32).view(3, 20) + 1000
    req_pool_indices, seq_lens, topk, cols = torch.tensor([2, 0]), torch.tensor([5, 11]), 2, 3
    out = torch.full((2 * topk * cols + 2,), -1, dtype=torch.int64)
    cpu_host.assign_draft_cache_locs_contiguous_cpu(req_pool_indices, table, seq_lens, out, 20, topk, cols)
    want = [int(table[r, n + j]) for r, n in zip(req_pool_indices.tolist(), seq_lens.tolist()) for j in range(topk * cols)]
    assert out.tolist() == want + [-1, -1]


def _tree_reference(parents: list[int], seq_len: int):
    """The contract of build_tree_kernel_efficient from a tree's parent list (node 0 the root):
    mask rows (node, its ancestors), positions (seq_len + depth), first child, next sibling."""
    mask = tree_mask(parents)
    positions = [seq_len + sum(row) - 1 for row in mask]
    children = [[c for c in range(len(parents)) if parents[c] == p] for p in range(len(parents))]
    first = [kids[0] if kids else -1 for kids in children]
    sibling = [-1] * len(parents)
    for kids in children:
        for a, b in zip(kids, kids[1:]):
            sibling[a] = b
    return mask, positions, first, sibling


@pytest.mark.parametrize("mode", [0, 1])  # FULL_MASK, QLEN_ONLY (SGLang's CPU default)
def test_build_tree_kernel_efficient_cpu_against_the_parent_lists(mode):
    # Request 0: topk 1, 3 steps (SGLang's chain: parent_list arange(-1, ..), candidates 0, 1, 2):
    # a chain of 4 nodes. Request 1: topk 2; candidates 0, 1 hang from the root, 2..5 from
    # candidates parent_list[1..2] = 0, 1, 6..9 from parent_list[3..4] = 3, 4; the draft kept
    # candidates 0, 1, 3, 6, i.e. nodes 1..4 with parents [-1, 0, 0, 1, 3].
    cases = [(torch.tensor([[-1, 0, 1, 2, 3]]), torch.tensor([[0, 1, 2, 3]]), 1, [-1, 0, 1, 2, 3], 7),
             (torch.tensor([[-1, 0, 1, 3, 4]]), torch.tensor([[0, 1, 3, 6]]), 2, [-1, 0, 0, 1, 3], 3)]  # fmt: skip
    for parent_list, chosen, topk, parents, seq_len in cases:
        n = len(parents)
        size = n * (seq_len + n) if mode == 0 else n * n
        mask = torch.full((size,), True)
        positions = torch.zeros(n, dtype=torch.int64)
        index, next_token, next_sibling = torch.full((3, 1, n), -1, dtype=torch.int64)
        cpu_host.build_tree_kernel_efficient_cpu(parent_list, chosen, torch.tensor([seq_len]), mask, positions, index,
                                                 next_token, next_sibling, topk, n - 1, n, mode)  # fmt: skip
        want_mask, want_positions, want_first, want_sibling = _tree_reference(parents, seq_len)
        rows = mask.view(n, -1)
        if mode == 0:  # the committed columns stay as the caller filled them
            assert rows[:, :seq_len].all()
        assert rows[:, -n:].tolist() == want_mask
        assert positions.tolist() == want_positions
        assert index.tolist() == [list(range(n))] and next_token.tolist() == [want_first]
        assert next_sibling.tolist() == [want_sibling]


def test_build_tree_kernel_efficient_cpu_packs_requests_one_after_another():
    """Two chain requests in one call: each request's rows after the previous request's (the
    FULL_MASK rows of request 1 are seq_lens[1] + n wide, after request 0's n rows of
    seq_lens[0] + n), retrieve_index counting flattened rows."""
    n, lens = 3, [2, 4]
    parent_list, chosen = torch.tensor([[-1, 0, 1]] * 2), torch.tensor([[0, 1]] * 2)
    mask = torch.full((sum(n * (s + n) for s in lens),), True)
    positions = torch.zeros(2 * n, dtype=torch.int64)
    index, next_token, next_sibling = torch.full((3, 2, n), -1, dtype=torch.int64)
    cpu_host.build_tree_kernel_efficient_cpu(parent_list, chosen, torch.tensor(lens), mask, positions, index, next_token,
                                             next_sibling, 1, 2, n, 0)  # fmt: skip
    chain = [[True, False, False], [True, True, False], [True, True, True]]
    first, second = mask[: n * (lens[0] + n)].view(n, -1), mask[n * (lens[0] + n) :].view(n, -1)
    assert first[:, lens[0]:].tolist() == chain and second[:, lens[1]:].tolist() == chain
    assert positions.tolist() == [2, 3, 4, 4, 5, 6] and index.tolist() == [[0, 1, 2], [3, 4, 5]]
