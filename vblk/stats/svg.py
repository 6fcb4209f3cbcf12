"""The virtio-blk path drawn as SVG, with the backend's numbers on the hops it measures.

Top to bottom: the guest's user space (fio) and kernel (block layer,
virtio-blk driver), the virtqueue in guest memory, KVM (ioeventfd for the
kick, irqfd for the interrupt), vblk with its stages, the host I/O stack and
the disk. Submission runs down the left, completion up the right. What the
backend cannot see (inside the guest and KVM) is drawn grey and dashed and
says "not measured here".

Every number is a ``<text>`` with an id; :func:`path_labels` gives the text
of each id, so the live page (:mod:`vblk.stats.page`) draws this same SVG
once and then only replaces those texts every second.
"""

from __future__ import annotations

from html import escape

from vblk.stats.view import QueueView, fmt_ns, fmt_rate

WIDTH = 760
HEIGHT = 660

_GREY = "#8a8f98"
_INK = "#1d2330"
_MEASURED = "#1565c0"
_FILL = "#e8f0fb"
_FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"

#: vblk's stages in the row drawn inside its box (backend is their total, drawn below).
_ROW = ("queue_wait", "device", "host_io", "complete", "notify")
_WHAT = {
    "queue_wait": "kick → pop",
    "device": "pop → submit",
    "host_io": "submit → done",
    "complete": "done → used ring",
    "notify": "used → interrupt",
}


def path_labels(view: QueueView | None, title: str = "") -> dict[str, str]:
    """The text of every numbered element of the picture, by id."""
    labels = {"title": title or "vblk: the virtio-blk path"}
    stages = view["stages"] if view is not None else {}
    for name in (*_ROW, "backend"):
        st = stages.get(name)
        if st is None or st["count"] <= 0:
            labels[f"{name}-p50"] = "p50 -"
            labels[f"{name}-p99"] = "p99 -"
        else:
            labels[f"{name}-p50"] = f"p50 {fmt_ns(st['p50_ns'])}"
            labels[f"{name}-p99"] = f"p99 {fmt_ns(st['p99_ns'])}"
    if view is None:
        labels["rate"] = "no requests yet"
        labels["mix"] = ""
        labels["errors"] = ""
        return labels
    labels["rate"] = (
        f"{fmt_rate(view['iops'])} requests · read {view['read_mbps']:.1f} MB/s"
        f" · write {view['write_mbps']:.1f} MB/s · {view['inflight']} in flight"
    )
    labels["mix"] = (
        f"{view['kicks_per_req']:.2f} kicks, {view['irqs_per_req']:.2f} interrupts per request"
    )
    labels["errors"] = f"{fmt_rate(view['held'])} held interrupts · {view['errors']} errors"
    return labels


def _text(
    x: float,
    y: float,
    text: str,
    *,
    ident: str = "",
    size: int = 12,
    color: str = _INK,
    anchor: str = "middle",
    weight: str = "normal",
) -> str:
    idattr = f" id='{ident}'" if ident else ""
    return (
        f"<text{idattr} x='{x:g}' y='{y:g}' font-size='{size}' fill='{color}' "
        f"text-anchor='{anchor}' font-weight='{weight}' {_FONT}>{escape(text)}</text>"
    )


def _box(x: float, y: float, w: float, h: float, measured: bool, fill: str = "white") -> str:
    if measured:
        return (
            f"<rect x='{x:g}' y='{y:g}' width='{w:g}' height='{h:g}' rx='6' "
            f"fill='{fill}' stroke='{_MEASURED}' stroke-width='2'/>"
        )
    return (
        f"<rect x='{x:g}' y='{y:g}' width='{w:g}' height='{h:g}' rx='6' fill='#f4f5f7' "
        f"stroke='{_GREY}' stroke-width='1.5' stroke-dasharray='6 4'/>"
    )


def _arrow(x1: float, y1: float, x2: float, y2: float, measured: bool) -> str:
    color = _MEASURED if measured else _GREY
    dash = "" if measured else " stroke-dasharray='5 4'"
    marker = "arrow-m" if measured else "arrow-u"
    return (
        f"<line x1='{x1:g}' y1='{y1:g}' x2='{x2:g}' y2='{y2:g}' stroke='{color}' "
        f"stroke-width='2'{dash} marker-end='url(#{marker})'/>"
    )


def path_svg(labels: dict[str, str]) -> str:
    """The picture as a standalone SVG document, numbered from ``labels``."""
    p: list[str] = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}'>",
        "<defs>",
        "<marker id='arrow-m' markerWidth='10' markerHeight='8' refX='9' refY='4' "
        f"orient='auto'><path d='M0,0 L10,4 L0,8 z' fill='{_MEASURED}'/></marker>",
        "<marker id='arrow-u' markerWidth='10' markerHeight='8' refX='9' refY='4' "
        f"orient='auto'><path d='M0,0 L10,4 L0,8 z' fill='{_GREY}'/></marker>",
        "</defs>",
        f"<rect width='{WIDTH}' height='{HEIGHT}' fill='white'/>",
        _text(WIDTH / 2, 24, labels.get("title", ""), ident="title", size=16, weight="bold"),
    ]
    left, right = 70, WIDTH - 70  # the submission and completion arrows
    x0, w = 110, WIDTH - 220
    unmeasured = (
        (44, "Guest user space", "fio: io_submit / io_uring → … → completion"),
        (112, "Guest kernel", "block layer (blk-mq) · virtio-blk driver · interrupt handler"),
        (180, "Virtqueue (guest memory)", "avail ring: requests in · used ring: completions out"),
        (248, "KVM", "ioeventfd: the kick · irqfd: the interrupt"),
    )
    for y, name, what in unmeasured:
        p.append(_box(x0, y, w, 50, measured=False))
        p.append(_text(x0 + 12, y + 21, name, anchor="start", weight="bold", color=_INK))
        p.append(_text(x0 + 12, y + 39, what, anchor="start", size=11, color=_GREY))
        p.append(
            _text(x0 + w - 10, y + 21, "not measured here", anchor="end", size=11, color=_GREY)
        )
    # Submission (down, left) and completion (up, right) through the unmeasured layers:
    # the kick lands on queue_wait, the interrupt leaves from notify.
    vy, vh = 326, 190
    by = vy + 34
    p.append(_arrow(left, 50, left, by, measured=False))
    p.append(_arrow(right, by, right, 50, measured=False))
    for x, word in ((left - 10, "submission"), (right + 14, "completion")):
        p.append(
            f"<g transform='rotate(-90 {x} 190)'>{_text(x, 190, word, size=11, color=_GREY)}</g>"
        )
    p.append(_text(left + 6, 316, "kick", size=11, color=_GREY, anchor="start"))
    p.append(_text(right - 6, 316, "interrupt", size=11, color=_GREY, anchor="end"))
    # vblk and its stages.
    p.append(_box(40, vy, WIDTH - 80, vh, measured=True, fill=_FILL))
    p.append(
        _text(52, vy + 20, "vblk (measured here)", anchor="start", weight="bold", color=_MEASURED)
    )
    p.append(
        _text(WIDTH - 52, vy + 20, labels.get("rate", ""), ident="rate", anchor="end", size=11)
    )
    bw, gap = 124, 9
    sx = (WIDTH - (5 * bw + 4 * gap)) / 2
    for i, name in enumerate(_ROW):
        bx = sx + i * (bw + gap)
        p.append(_box(bx, by, bw, 84, measured=True))
        p.append(_text(bx + bw / 2, by + 18, name, weight="bold"))
        p.append(_text(bx + bw / 2, by + 34, _WHAT[name], size=10, color=_GREY))
        p.append(
            _text(
                bx + bw / 2,
                by + 54,
                labels.get(f"{name}-p50", ""),
                ident=f"{name}-p50",
                color=_MEASURED,
            )
        )
        p.append(
            _text(
                bx + bw / 2,
                by + 72,
                labels.get(f"{name}-p99", ""),
                ident=f"{name}-p99",
                color=_MEASURED,
            )
        )
        if i < len(_ROW) - 1:
            p.append(_arrow(bx + bw, by + 42, bx + bw + gap, by + 42, measured=True))
    ty = by + 110
    p.append(_text(52, ty, "backend = pop → interrupt", anchor="start", size=11))
    p.append(
        _text(
            52,
            ty + 20,
            labels.get("backend-p50", ""),
            ident="backend-p50",
            anchor="start",
            color=_MEASURED,
            weight="bold",
        )
    )
    p.append(
        _text(
            160,
            ty + 20,
            labels.get("backend-p99", ""),
            ident="backend-p99",
            anchor="start",
            color=_MEASURED,
            weight="bold",
        )
    )
    p.append(_text(WIDTH - 52, ty, labels.get("mix", ""), ident="mix", anchor="end", size=11))
    p.append(
        _text(WIDTH - 52, ty + 20, labels.get("errors", ""), ident="errors", anchor="end", size=11)
    )
    # host_io goes down into the host and back.
    hx = sx + 2 * (bw + gap) + bw / 2
    hy = vy + vh + 30
    p.append(_arrow(hx - 20, by + 84, hx - 20, hy, measured=True))
    p.append(_arrow(hx + 20, hy, hx + 20, by + 84, measured=True))
    p.append(_box(x0, hy, w, 44, measured=True))
    p.append(_text(x0 + 12, hy + 19, "Host I/O stack", anchor="start", weight="bold"))
    p.append(
        _text(
            x0 + 12,
            hy + 36,
            "page cache · block layer · io_uring/threads, or the"
            " network for NBD/RBD (inside host_io)",
            anchor="start",
            size=11,
            color=_GREY,
        )
    )
    p.append(_arrow(hx - 20, hy + 44, hx - 20, hy + 66, measured=True))
    p.append(_arrow(hx + 20, hy + 66, hx + 20, hy + 44, measured=True))
    p.append(_box(x0, hy + 66, w, 34, measured=True))
    p.append(_text(x0 + 12, hy + 88, "Disk", anchor="start", weight="bold"))
    p.append(_text(x0 + w - 10, hy + 88, "(inside host_io)", anchor="end", size=11, color=_GREY))
    p.append("</svg>")
    return "\n".join(p) + "\n"
