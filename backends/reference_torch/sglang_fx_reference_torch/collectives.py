"""The reference backend's collectives: torch.distributed on the host's own TP group (gloo on CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sglang_fx.errors import UnsupportedConfigError
from sglang_fx.parallel import Group


class TorchCollectives:
    """Sum and gather over one host group; the identity for a group of one."""

    def __init__(self, group: Group):
        if group.size > 1 and (group.torch_group is None or not dist.is_initialized()):
            raise UnsupportedConfigError(
                f"reference_torch runs its collectives through torch.distributed, but the host passed no torch "
                f"process group for {group.name!r}; initialise torch.distributed and pass Group.torch_group"
            )
        self.group, self.size = group.torch_group, group.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group (x [*] on every rank; summed in place and returned)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] from every rank -> [N, size * C], rank blocks side by side in group order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
