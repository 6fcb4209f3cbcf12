"""vhost-user: the wire codec (sans-IO), the backend session and the userspace frontend.

The codec sits apart from both ends so they parse and frame messages identically.
"""
