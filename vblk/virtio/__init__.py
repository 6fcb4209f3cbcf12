"""virtio."""
