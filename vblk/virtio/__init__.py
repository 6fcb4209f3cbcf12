"""The split virtqueue, shared by both ends of vblk.

:mod:`~vblk.virtio.defs` holds the spec's constants and ring geometry,
:mod:`~vblk.virtio.queue` the device side (the vhost-user backend walks the
guest's chains through bounds-checked guest memory) and
:mod:`~vblk.virtio.driver` the driver side (the userspace client, and tests
that play the guest). Both sides run in different processes over shared
memory, so every shared u16 is moved with a single load or store.
"""
