"""virtio-blk constants from the virtio 1.2 spec, block device chapter (5.2)."""

from enum import IntEnum

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

#: Bytes of the request header (le32 type, le32 reserved/ioprio, le64 sector).
HEADER_SIZE = 16
#: Bytes of one discard / write-zeroes segment (le64 sector, le32 num_sectors, le32 flags).
SEGMENT_SIZE = 16
#: GET_ID answers with at most this many bytes, NUL padded.
ID_BYTES = 20


class Feature(IntEnum):
    """virtio-blk feature bit numbers."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16


class ReqType(IntEnum):
    """Request types found in the first field of the header."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    """The status byte the device writes last."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


#: Flag bit in a write-zeroes segment: the device may deallocate the range.
WRITE_ZEROES_FLAG_UNMAP = 1
