"""vblk: the virtio-blk I/O stack in Python.

A vhost-user-blk device backend (``vblk serve``), a userspace virtio-blk driver
(``vblk.client``) and the split virtqueue both of them stand on.
"""

__version__ = "0.1.0"
