"""The errors sglang-fx raises. Every message names the problem and the fix.

All derive from `SglangFxError`, so a caller can catch the family; each subclass also derives
from the builtin a caller would naturally expect (LookupError, ImportError, ValueError,
MemoryError), so generic handlers keep working.
"""

from __future__ import annotations


class SglangFxError(Exception):
    """Base class of every error raised by sglang-fx and its backends."""


class UnknownBackendError(SglangFxError, LookupError):
    """No installed distribution registers a backend of that name."""


class DuplicateBackendError(SglangFxError, LookupError):
    """Two installed distributions register the same backend name."""


class BackendLoadError(SglangFxError, ImportError):
    """A backend's plugin failed to import, or does not satisfy the SPI."""


class BackendUnavailableError(SglangFxError, RuntimeError):
    """A backend is installed but cannot run here (framework or device missing)."""


class UnsupportedConfigError(SglangFxError, ValueError):
    """The selected backend cannot run this model / dtype / device / page size."""


class CheckpointError(SglangFxError, ValueError):
    """A checkpoint is missing, malformed, truncated, or does not match its config."""


class KVPoolFullError(SglangFxError, MemoryError):
    """The paged KV pool has too few free pages for a request. Nothing was changed."""
