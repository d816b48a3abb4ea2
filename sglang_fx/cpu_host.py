"""Compatibility shim for CPU-only hosts: the one place sglang-fx works around packages whose
PyPI builds assume CUDA. It edits no installed file.

The one-line `sglang_fx_cpu_host.pth` (sglang_fx/sglang_fx_cpu_host.pth) lies at the top of
site-packages, so that `install()` runs at interpreter start-up in every process (SGLang's
launcher and its scheduler subprocesses import these packages before any plugin of ours loads).
The sglang-fx wheel installs it (setup.py puts it there); for a source checkout installed
editable, `sglang-fx setup-cpu-host` writes the same file (`make setup` runs it).
`install()` only adds an import hook: it imports nothing heavy, and each fix below is applied
when, and only when, the affected package is first imported on a host that needs it. On a host
with a CUDA build of torch, sgl_kernel installed and libibverbs in the system, no fix applies:
the hook only answers "not mine" to the imports it watches.

Fixes:
- torchvision: PyPI's only Linux wheel is a CUDA build whose `_C.so` cannot load against the
  CPU torch; its `_meta_registrations` then calls `register_fake("torchvision::nms")` and
  `("torchvision::qnms")` unguarded, which raises because those operators were never defined,
  so `import torchvision` (and thus transformers and SGLang) crashes. We define the two operator
  schemas first (no kernel: calling nms/qnms raises torch's "no kernel" error, as it would
  without the extension). Applied only when torch is a CPU build and torchvision a CUDA one.
- sgl_kernel: SGLang's compiled kernels. PyPI only has CUDA wheels, and its CPU build needs a
  source build (for Intel AMX). Without it SGLang's layers take their `forward_native` torch
  paths on CPU, but a few modules still import names from `sgl_kernel` when
  SGLANG_USE_CPU_ENGINE=1, at import time. When no `sgl_kernel` is installed and torch is a
  CPU build, `import sgl_kernel` gets a small stand-in module (`_SGL_KERNEL_CPU` below)
  holding real torch implementations of the functions SGLang imports on the CPU path and
  can call without speculative decoding:
    assign_req_to_token_pool_cpu  (srt/mem_cache/allocation.py: writes the slots of newly
        allocated tokens into the req-to-token table, every decode step);
    copy_all_layer_kv_cache_cpu  (kernels/ops/kvcache/cache_move.py: the KV pool's slot
        move, `move_kv_cache`; SGLang also runs it once as a warm-up when a pool is built
        with enable_kv_cache_copy, i.e. with speculative decoding).
  and, for speculative decoding (NGRAM, and the verification shared with EAGLE/STANDALONE at
  topk 1), the operators of upstream's CPU reference (sgl-kernel/csrc/cpu/spec.cpp), written
  from the contracts of their SGLang callers (kernels/ops/speculative/*.py):
    reconstruct_indices_from_tree_mask  (in `sgl_kernel.speculative`, a submodule of the
        stand-in; NGRAM: positions and tree links of its draft trees);
    assign_extend_cache_locs_cpu  (the draft tokens' KV slots, read from req_to_token);
    verify_tree_greedy_cpu  (greedy verification: the longest draft path the target agrees
        with, and the target's token after it);
    fill_accept_out_cache_loc_cpu, fill_bonus_tokens_cpu  (the accepted tokens' slots and
        the bonus token per request, after verification).
  For drafting with a draft model (STANDALONE; shared with EAGLE), from the same contracts:
    assign_draft_cache_locs_contiguous_cpu  (the draft steps' KV slots, read from req_to_token);
    build_tree_kernel_efficient_cpu  (the verify tree of the draft's candidates: mask,
        positions, tree links; any topk, bool masks).
  The kernel only multi-layer EAGLE drafting calls (input-id rotation) is provided as a
  function that raises NotImplementedError when called: that algorithm is refused at start-up
  for sglang-fx backends, and an import must not fail for it.
  Any other name raises ImportError("cannot import name ..."), as if sgl_kernel were absent,
  so SGLang's own `try: from sgl_kernel import X / except ImportError` fallbacks keep working,
  and an unexpected use fails loudly instead of computing something wrong.
  `torch.ops.sgl_kernel` stays empty, so SGLang's AMX checks
  (`_is_intel_amx_backend_available`) still answer False.

- mooncake (SGLang's PD transfer engine): its `engine.so` links libibverbs.so.1, which no
  wheel provides. Before `mooncake` is first imported, `sglang_fx.system_libs.preload()` loads
  the copy `sglang-fx install-system-libs` unpacked into the environment, unless the system has
  one. Only processes that import the engine (a PD server's schedulers) pay for it.

And one that is not about CUDA, but needs the same start-up hook because no plugin of ours runs
otherwise:
- SGLang's own latency tool, `python -m sglang.benchmark.one_batch` (and its spawned
  tensor-parallel ranks), builds its ModelRunner without loading SGLang's general plugins, so
  `--model-impl mindspore` would pick SGLang's Ascend-only wrapper and any other sglang-fx name
  would be unknown. Right after `sglang.srt.model_executor.model_runner` is imported, in that
  tool's processes only, `sglang_fx.sglang.bench_one_batch.load_plugins_with_the_model_runner`
  has SGLang load its plugins when the first ModelRunner is built (details there). In every
  other process (the launcher and Engine load the plugins themselves) it does nothing.

Not done here: SGLANG_USE_CPU_ENGINE=1, which SGLang reads at import time to take its CPU path.
This hook runs in every Python process of the environment, and choosing SGLang's device is the
launcher's decision, not the interpreter's: `python -m sglang_fx.sglang.launch_server ...
--device cpu` and `sglang_fx.sglang.use_cpu_engine()` (before `import sglang`) set it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path

#: The .pth file (its one line calls install()): sglang_fx/sglang_fx_cpu_host.pth, installed as it is.
PTH_NAME = "sglang_fx_cpu_host.pth"

_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []  # keeps the torch.library.Library objects (and their definitions) alive


def _torchvision_is_cuda_build() -> bool:
    spec = importlib.machinery.PathFinder.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    return version.is_file() and "+cu" in version.read_text()


def fix_torchvision() -> bool:
    """Define the torchvision operators a CUDA torchvision needs on a CPU torch. Returns True
    when it did (the fix was needed)."""
    import torch

    if torch.version.cuda is not None or not _torchvision_is_cuda_build() or _libraries:
        return False
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_OPS:
        lib.define(schema)
    _libraries.append(lib)
    return True


def _bytes_at(address: int, nbytes: int):
    """A uint8 torch tensor aliasing nbytes of host memory at address (no copy)."""
    import ctypes

    import torch

    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """sgl_kernel's CPU KV slot move, in torch: for every buffer b (data_ptrs[b] the address
    of a contiguous [num_slots, ...] KV buffer, strides[b] its bytes per slot), copy slot
    src_loc[i] over slot tgt_loc[i], for all i. Every source is read before any target is
    written, as in SGLang's triton kernel (`copy_all_layer_kv_cache_tiled`)."""
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.long(), src_loc.long()
    rows = int(max(int(tgt.max()), int(src.max()))) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        buf = _bytes_at(int(address), rows * int(stride)).view(rows, int(stride))
        buf[tgt] = buf[src]


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len) -> None:
    """sgl_kernel's CPU req-to-token write, in torch: the new tokens of request i take the
    next end_offset[i] - start_offset[i] slots of out_cache_loc (requests in order), written
    to req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]. Same result as
    SGLang's triton kernel `assign_req_to_token_pool` (pool_len = req_to_token.shape[1])."""
    import torch

    start, end = start_offset.long(), end_offset.long()
    lens = end - start  # [B] new tokens per request
    total = int(lens.sum())
    if total == 0:
        return
    row = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)  # [total]
    first = torch.cumsum(lens, 0) - lens  # [B] index of each request's first token in out_cache_loc
    col = start[row] + torch.arange(total, device=lens.device) - first[row]
    req_to_token[req_pool_indices.long()[row], col] = out_cache_loc[:total].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len) -> None:
    """The reverse of assign_req_to_token_pool_cpu: out_cache_loc (packed, requests in order)
    receives req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] for every i.
    pool_len = req_to_token.shape[1]."""
    import torch

    start, end = start_offset.long(), end_offset.long()
    lens = end - start
    total = int(lens.sum())
    if total == 0:
        return
    row = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    col = start[row] + torch.arange(total, device=lens.device) - first[row]
    out_cache_loc[:total] = req_to_token[req_pool_indices.long()[row], col].to(out_cache_loc.dtype)


def reconstruct_indices_from_tree_mask(tree_mask, verified_seq_len, positions, retrieve_index, retrieve_next_token,
                                       retrieve_next_sibling, batch_size, draft_token_num) -> None:  # fmt: skip
    """The verify metadata of NGRAM's draft trees, from their masks. tree_mask: [B * n * n]
    bool, row-major [B, n, n]: (b, i, j) True when node j is node i or an ancestor of it (nodes
    in breadth-first order, node 0 the root). Writes, for every request b and node t:
      positions [B * n]            verified_seq_len[b] + the number of t's strict ancestors;
      retrieve_index [B, n]        b * n + t (the node's row in the step's flattened tokens);
      retrieve_next_token [B, n]   t's first child (its smallest-index descendant), else -1;
      retrieve_next_sibling [B, n] the next node after t with t's parent, else -1 (-1 for a root).
    """
    import torch

    n, device = draft_token_num, tree_mask.device
    mask = tree_mask.reshape(batch_size, n, n).to(torch.bool)
    order = torch.arange(n, device=device)
    ancestors = mask & (order[None, :] < order[:, None])[None]  # [B, i, j]: j a strict ancestor of i
    positions.view(batch_size, n)[:] = (verified_seq_len.view(-1, 1).long() + ancestors.sum(-1)).to(positions.dtype)
    retrieve_index.view(batch_size, n)[:] = (torch.arange(batch_size, device=device)[:, None] * n + order).to(retrieve_index.dtype)
    none = torch.full((batch_size, n, n), n, device=device)
    # first child: min k with tid among k's ancestors (the smallest descendant is a child)
    child = torch.where(ancestors.transpose(1, 2), order.expand(batch_size, n, n), none).min(-1).values
    retrieve_next_token.view(batch_size, n)[:] = torch.where(child < n, child, -1).to(retrieve_next_token.dtype)
    parent = torch.where(ancestors, order.expand(batch_size, n, n), -1).max(-1).values  # [B, n], -1 for a root
    same = (parent[:, None, :] == parent[:, :, None]) & (order[None, :] > order[:, None])[None] & (parent[:, :, None] >= 0)
    sibling = torch.where(same, order.expand(batch_size, n, n), none).min(-1).values
    retrieve_next_sibling.view(batch_size, n)[:] = torch.where(sibling < n, sibling, -1).to(retrieve_next_sibling.dtype)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                           retrive_next_sibling, target_predict) -> None:  # fmt: skip
    """Greedy verification of draft trees (argument names as SGLang passes them). For request b
    (candidates [B, n] its draft tokens, node 0 the last committed token; target_predict [B, n]
    the target's argmax after each node; the retrive_* [B, n] from the tree): starting at node 0,
    repeatedly take the child whose draft token equals the target's prediction after the current
    node (children in next_token/next_sibling order), until none does or accept_index [B, S] is
    full. Writes accept_index[b, 0..a] (the flattened rows b*n + t of node 0 and the a accepted
    nodes; the rest untouched), accept_token_num[b] = a, and predicts [B*n] at each of those rows:
    the target's token there (for the last, the bonus token)."""
    batch, n = candidates.shape
    steps = accept_index.shape[1]
    flat_target = target_predict.reshape(-1)
    for b in range(batch):
        cand, index = candidates[b].tolist(), retrive_index[b].tolist()
        nxt, sib = retrive_next_token[b].tolist(), retrive_next_sibling[b].tolist()
        last, node, accepted = index[0], 0, 0
        accept_index[b, 0] = last
        for _ in range(1, steps):
            target = int(flat_target[last])
            node = nxt[node]
            while node != -1 and cand[node] != target:
                node = sib[node]
            if node == -1:
                break
            predicts[last] = target
            accepted += 1
            last = index[node]
            accept_index[b, accepted] = last
        accept_token_num[b] = accepted
        predicts[last] = flat_target[last]


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """The slots of the accepted tokens, packed: accept_index (any shape, -1 = rejected) names
    rows of out_cache_loc; the k-th accepted entry (in flattened order) writes
    accept_out_cache_loc[k] = out_cache_loc[accept_index entry]."""
    idx = accept_index.reshape(-1)
    kept = idx[idx != -1].long()
    accept_out_cache_loc[: kept.numel()] = out_cache_loc[kept].to(accept_out_cache_loc.dtype)


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride) -> None:
    """bonus_tokens[i] = the last accepted token of request i: accept_tokens (flattened, one row
    of accept_stride per request) at i * accept_stride + accept_lens[i] - 1 (accept_lens counts
    the bonus token)."""
    import torch

    lens = accept_lens.long()
    rows = torch.arange(lens.numel(), device=lens.device) * int(accept_stride)
    bonus_tokens[: lens.numel()] = accept_tokens.reshape(-1)[rows + lens - 1].to(bonus_tokens.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len, topk,
                                           num_cols) -> None:  # fmt: skip
    """The KV slots of EAGLE-style drafting (STANDALONE at topk 1), read from req_to_token, where
    the scheduler already placed them after each request's committed tokens: request b's
    topk * num_cols slots, out_cache_loc[b * topk * num_cols + j] = req_to_token[req_pool_indices[b],
    seq_lens[b] + j] for j < topk * num_cols. pool_len = req_to_token.shape[1]. (Contract of
    kernels/ops/speculative/cache_locs.py::assign_draft_cache_locs_contiguous_func.)"""
    import torch

    width = int(topk) * int(num_cols)
    batch = seq_lens.numel()
    if batch == 0 or width == 0:
        return
    cols = seq_lens.long().view(-1, 1) + torch.arange(width, device=seq_lens.device)  # [B, width]
    rows = req_to_token[req_pool_indices.long()]  # [B, pool_len]
    out_cache_loc[: batch * width] = torch.gather(rows, 1, cols).reshape(-1).to(out_cache_loc.dtype)


def build_tree_kernel_efficient_cpu(parent_list, top_scores_index, seq_lens, tree_mask, positions, retrieve_index,
                                    retrieve_next_token, retrieve_next_sibling, topk, spec_steps, num_verify_tokens,
                                    tree_mask_mode) -> None:  # fmt: skip
    """The verify tree of EAGLE-style drafts (STANDALONE, EAGLE), from what the draft loop chose
    (contract of kernels/ops/speculative/spec_tree.py::build_tree_kernel_efficient_func and its
    Triton kernel). Per request b, n = num_verify_tokens nodes: node 0 the root (the bonus token),
    node i > 0 the draft candidate top_scores_index[b, i - 1] (sorted ascending) of the draft
    loop's flattened candidates; candidate c's parent is candidate parent_list[b, c // topk],
    i.e. the node whose top_scores_index equals it, or the root when c // topk == 0.
    Writes (retrieve_* arrive filled with -1):
      positions [B * n]             seq_lens[b] + node depth (the root at depth 0);
      retrieve_index [B, n]         b * n + i;
      retrieve_next_token [B, n]    a node's first child: the smallest-index child;
      retrieve_next_sibling [B, n]  the next larger-index child of the same parent, else -1;
      tree_mask                     row i of request b: True for node i, its ancestors and the
                                    root, False for other nodes. tree_mask_mode 1 (QLEN_ONLY, the
                                    CPU default) is [B, n, n]; 0 (FULL_MASK) is [n, seq_lens[b] + n]
                                    per request, packed, the committed columns left as they are.
    Ancestor walks stop after spec_steps levels. Plain loops (the C++ reference's shape); the
    tree is small (n nodes per request)."""
    import torch

    n, topk, depth = int(num_verify_tokens), int(topk), int(spec_steps)
    if int(tree_mask_mode) not in (0, 1):
        raise NotImplementedError(f"build_tree_kernel_efficient_cpu: tree mask mode {int(tree_mask_mode)} (only FULL_MASK 0 "
                                  "and QLEN_ONLY 1)")  # fmt: skip
    parents, chosen = parent_list.tolist(), top_scores_index.tolist()
    lens = [int(x) for x in seq_lens.tolist()]
    if tree_mask.dtype != torch.bool:
        raise NotImplementedError(f"build_tree_kernel_efficient_cpu: a {tree_mask.dtype} tree mask (only bool)")
    mask = tree_mask
    pos, nxt, sib, idx = (t.view(len(lens), n) for t in (positions, retrieve_next_token, retrieve_next_sibling, retrieve_index))
    start = 0
    for b, seq_len in enumerate(lens):
        sel = chosen[b]

        def parent_node(i: int) -> int | None:
            """The node index of node i's parent (0 = the root), None if not among the nodes."""
            up = sel[i - 1] // topk
            if up == 0:
                return 0
            target = parents[b][up]
            return next((k + 1 for k in range(n - 1) if sel[k] == target), None)

        for i in range(n - 1, 0, -1):
            idx[b, i] = b * n + i
            p = parent_node(i)
            if p is not None:
                first = int(nxt[b, p])
                nxt[b, p] = i
                if first != -1:
                    sib[b, i] = first
        idx[b, 0] = b * n
        width = (seq_len + n) if int(tree_mask_mode) == 0 else n
        base = start + (seq_len if int(tree_mask_mode) == 0 else 0)
        for i in range(n):
            row = base + i * width
            mask[row : row + n] = False
            mask[row] = True
            node, level = i, 0
            while node > 0 and level < depth:
                mask[row + node] = True
                level += 1
                node = parent_node(node)
                if node is None:
                    break
            pos[b, i] = seq_len + level
        start += n * width


#: name -> implementation, for the `sgl_kernel` stand-in. Only functions SGLang calls on CPU.
_SGL_KERNEL_CPU = {
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
    "assign_extend_cache_locs_cpu": assign_extend_cache_locs_cpu,
    "verify_tree_greedy_cpu": verify_tree_greedy_cpu,
    "fill_accept_out_cache_loc_cpu": fill_accept_out_cache_loc_cpu,
    "fill_bonus_tokens_cpu": fill_bonus_tokens_cpu,
    "assign_draft_cache_locs_contiguous_cpu": assign_draft_cache_locs_contiguous_cpu,
    "build_tree_kernel_efficient_cpu": build_tree_kernel_efficient_cpu,
}
#: The stand-in's submodules: name -> {name -> implementation}.
_SGL_KERNEL_SUBMODULES = {
    "speculative": {"reconstruct_indices_from_tree_mask": reconstruct_indices_from_tree_mask},
}


def _not_on_cpu(name: str, feature: str):
    def call(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} ({feature}) has no CPU implementation here: sgl_kernel is not "
            "installed and sglang-fx's stand-in (sglang_fx.cpu_host) only lets SGLang import it. "
            f"Turn {feature} off, or install a CPU build of sgl-kernel."
        )

    call.__name__ = call.__qualname__ = name
    return call


#: Names SGLang imports at module level on CPU but only calls for features sglang-fx does not
#: support on CPU; calling one raises NotImplementedError (never a wrong result).
_SGL_KERNEL_IMPORT_ONLY = {
    # kernels/ops/speculative/multi_layer_eagle.py: multi-layer EAGLE drafting
    "rotate_input_ids_cpu": "multi-layer EAGLE speculative decoding",
}
_SGL_KERNEL_CPU.update({n: _not_on_cpu(n, f) for n, f in _SGL_KERNEL_IMPORT_ONLY.items()})


def _sgl_kernel_missing(name: str):
    raise AttributeError(
        f"sgl_kernel.{name} is not available: sgl_kernel is not installed, and sglang-fx's CPU "
        f"stand-in (sglang_fx.cpu_host) only provides {', '.join(sorted(_SGL_KERNEL_CPU))}. "
        "Install a CPU build of sgl-kernel, or report the SGLang code path that needs it."
    )


class _SglKernelLoader(importlib.abc.Loader):
    def __init__(self, names: dict):
        self.names = names

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module) -> None:
        module.__dict__.update(self.names)
        module.__doc__ = "sglang-fx CPU stand-in for sgl_kernel (see sglang_fx.cpu_host)."
        module.__getattr__ = _sgl_kernel_missing
        module.SGLANG_FX_STAND_IN = True


def sgl_kernel_spec(name: str):
    """The stand-in's spec (a package, for its submodules), when `sgl_kernel` is not installed
    and torch is a CPU build."""
    if importlib.machinery.PathFinder.find_spec(name) is not None or not _torch_is_cpu_build():
        return None
    return importlib.machinery.ModuleSpec(name, _SglKernelLoader(_SGL_KERNEL_CPU), origin="sglang_fx.cpu_host", is_package=True)


def sgl_kernel_submodule_spec(name: str):
    """The spec of a stand-in submodule (`sgl_kernel.speculative`), once the stand-in is loaded."""
    parent = sys.modules.get("sgl_kernel")
    names = _SGL_KERNEL_SUBMODULES.get(name.split(".", 1)[1])
    if parent is None or not getattr(parent, "SGLANG_FX_STAND_IN", False) or names is None:
        return None
    return importlib.machinery.ModuleSpec(name, _SglKernelLoader(names), origin="sglang_fx.cpu_host")


def _torch_is_cpu_build() -> bool:
    import torch

    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def preload_system_libs() -> bool:
    """Before `import mooncake`: the system libraries its engine links (see system_libs)."""
    from . import system_libs

    system_libs.preload()
    return True


def sglang_one_batch_plugins():
    """Before `sglang.srt.model_executor.model_runner` loads: in SGLang's own one_batch, the
    action that has SGLang load its plugins (run once the module is loaded); elsewhere None."""
    from .sglang import bench_one_batch

    return bench_one_batch.load_plugins_with_the_model_runner if bench_one_batch.is_sglang_one_batch() else None


class _ThenRun(importlib.abc.Loader):
    """A module's own loader, followed by `then(module)` once the module has run."""

    def __init__(self, loader, then):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, name):  # get_code, get_source, is_package, ...: the module's own loader
        if name == "loader":  # not set yet
            raise AttributeError(name)
        return getattr(self.loader, name)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Runs a package's fix just before its first import (`fixes`, one-shot), provides
    stand-ins for modules that are missing here (`providers`, consulted on every lookup of
    that exact name), and runs an action right after a module is first imported, where the
    action's chooser returns one (`after`). Never imports the packages themselves."""

    fixes = {"torchvision": fix_torchvision, "mooncake": preload_system_libs}
    providers = {"sgl_kernel": sgl_kernel_spec, **{f"sgl_kernel.{m}": sgl_kernel_submodule_spec for m in _SGL_KERNEL_SUBMODULES}}
    # SGLang 0.5.23's ModelRunner module (a name here, not through sglang/compat.py, which imports torch:
    # this table is built at interpreter start-up).
    after = {"sglang.srt.model_executor.model_runner": sglang_one_batch_plugins}

    def find_spec(self, name, path=None, target=None):
        fix = self.fixes.pop(name, None)
        if fix is not None:
            fix()
        provider = self.providers.get(name)
        if provider is not None:
            return provider(name)
        chooser = self.after.get(name)
        then = chooser() if chooser is not None else None
        if then is not None:
            return self._spec_then(name, path, target, then)
        return None  # the normal finders import the package itself

    def _spec_then(self, name, path, target, then):
        """The spec the other finders give `name`, its loader followed by `then`."""
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if finder is not self and find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRun(spec.loader, then)
                return spec
        return None


def install() -> None:
    """Put the import hook in place (idempotent). Called from the .pth file."""
    if not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


def write_pth(site_packages: str | Path | None = None) -> Path:
    """Write the .pth file that calls install() at start-up (the one the sglang-fx wheel ships,
    for environments that installed sglang-fx from source, editable); returns its path."""
    import sysconfig

    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    target.write_text((Path(__file__).parent / PTH_NAME).read_text())
    return target
