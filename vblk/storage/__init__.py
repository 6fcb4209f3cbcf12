"""Storage backends: what a virtio-blk device's data lives on, behind one interface."""

from vblk.storage.base import (
    FLAG_FUA,
    FLAG_UNMAP,
    Capabilities,
    Completion,
    CompletionChannel,
    Op,
    Storage,
    StorageError,
    StorageQueue,
)

__all__ = [
    "FLAG_FUA",
    "FLAG_UNMAP",
    "Capabilities",
    "Completion",
    "CompletionChannel",
    "Op",
    "Storage",
    "StorageError",
    "StorageQueue",
]
