"""The frontend's side of vhost-user negotiation, with no sockets.

What the driver asks for is decided here, so ``vblk.client`` only moves
messages and ``vblk info`` can name every bit it prints. The choices follow
QEMU's vhost-user-blk frontend: take what the backend offers of what we
understand, insist on VERSION_1 (legacy layouts are not worth supporting) and
on protocol features (without CONFIG there is no capacity to learn).
"""

from __future__ import annotations

from vblk.blk.defs import Feature
from vblk.errors import ProtocolError
from vblk.vhost_user.defs import ProtocolFeature
from vblk.virtio import defs as vdefs

#: virtio-blk features the client knows how to use (or at least to honour).
BLK_FEATURES = frozenset(
    {
        Feature.SIZE_MAX,
        Feature.SEG_MAX,
        Feature.GEOMETRY,
        Feature.RO,
        Feature.BLK_SIZE,
        Feature.FLUSH,
        Feature.TOPOLOGY,
        Feature.CONFIG_WCE,
        Feature.MQ,
        Feature.DISCARD,
        Feature.WRITE_ZEROES,
    }
)

#: Transport feature names, by bit number (virtio 1.2 section 6, vhost-user spec).
TRANSPORT_FEATURE_NAMES: dict[int, str] = {
    vdefs.VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    vdefs.VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    26: "VHOST_F_LOG_ALL",
    vdefs.VIRTIO_F_RING_INDIRECT_DESC: "RING_INDIRECT_DESC",
    vdefs.VIRTIO_F_RING_EVENT_IDX: "RING_EVENT_IDX",
    vdefs.VHOST_USER_F_PROTOCOL_FEATURES: "VHOST_USER_F_PROTOCOL_FEATURES",
    vdefs.VIRTIO_F_VERSION_1: "VERSION_1",
    33: "ACCESS_PLATFORM",
    34: "RING_PACKED",
    35: "IN_ORDER",
    36: "ORDER_PLATFORM",
    37: "SR_IOV",
    38: "NOTIFICATION_DATA",
    39: "NOTIF_CONFIG_DATA",
    40: "RING_RESET",
}

#: Protocol features the client uses: acked SET_* messages, config space, queues.
WANTED_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK | 1 << ProtocolFeature.CONFIG
)


def bits(value: int) -> list[int]:
    """Bit numbers set in ``value``, lowest first."""
    return [i for i in range(value.bit_length()) if value >> i & 1]


def feature_name(bit: int) -> str:
    """``VIRTIO_BLK_F_<name>`` bits by their short name, transport bits too."""
    if bit in TRANSPORT_FEATURE_NAMES:
        return TRANSPORT_FEATURE_NAMES[bit]
    try:
        return Feature(bit).name
    except ValueError:
        return f"bit{bit}"


def feature_names(value: int) -> list[str]:
    return [feature_name(b) for b in bits(value)]


def protocol_feature_names(value: int) -> list[str]:
    names = []
    for b in bits(value):
        try:
            names.append(ProtocolFeature(b).name)
        except ValueError:
            names.append(f"bit{b}")
    return names


def select_features(offered: int, *, event_idx: bool = True) -> int:
    """The feature bits to acknowledge with SET_FEATURES, given what the backend offers.

    VHOST_USER_F_PROTOCOL_FEATURES is included: a backend that sees it acked
    leaves rings disabled until SET_VRING_ENABLE, which is what we send.
    """
    for need, why in (
        (vdefs.VIRTIO_F_VERSION_1, "VERSION_1 (legacy devices are not supported)"),
        (vdefs.VHOST_USER_F_PROTOCOL_FEATURES, "VHOST_USER_F_PROTOCOL_FEATURES"),
    ):
        if not offered >> need & 1:
            raise ProtocolError(f"backend does not offer {why}")
    wanted = {int(f) for f in BLK_FEATURES}
    wanted |= {vdefs.VIRTIO_F_VERSION_1, vdefs.VHOST_USER_F_PROTOCOL_FEATURES}
    if event_idx:
        wanted.add(vdefs.VIRTIO_F_RING_EVENT_IDX)
    mask = sum(1 << b for b in wanted)
    return offered & mask


def select_protocol_features(offered: int) -> int:
    """Protocol features to set; CONFIG is required (it is how capacity is learnt)."""
    if not offered >> ProtocolFeature.CONFIG & 1:
        raise ProtocolError("backend does not offer the CONFIG protocol feature (GET_CONFIG)")
    return offered & WANTED_PROTOCOL_FEATURES
