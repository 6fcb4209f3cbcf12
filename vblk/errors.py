"""Exception hierarchy shared by every layer, so callers can catch by concern."""


class VblkError(Exception):
    """Base of every error vblk raises on purpose."""


class GuestMemoryError(VblkError):
    """A guest address or length falls outside the mapped regions."""


class QueueError(VblkError):
    """A virtqueue is unusable: bad ring addresses, a bad avail index, a broken chain."""


class ProtocolError(VblkError):
    """The vhost-user peer sent something that breaks the protocol stream."""
