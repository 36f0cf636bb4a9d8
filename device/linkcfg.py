# The links an MCU board's configuration asks for, opened once at boot: the board's
# boardinit imports this and the board drops both once its links are open (their code
# need not stay in the heap; link.py keeps the link classes).
from link import DatagramLink, StreamLink


def open_links(board, frame_max, serial, udp):
    """The links an MCU board's configuration asks for: serial ("stdin" or a
    UART spec, opened by serial(board, spec, rx) with an rx buffer for buf_count
    messages) and UDP (udp(board), None when Wi-Fi is off). The board passes its
    boot-time module's functions, so their code is not kept after the boot."""
    cfg = board.config
    rx = int(cfg.get("buf_size", 2048)) * int(cfg.get("buf_count", 4))
    out = []
    ser = cfg.get("serial", "stdin")
    if ser:
        out.append(StreamLink(serial(board, ser, rx), frame_max, name="serial"))
    sock = udp(board)
    if sock is not None:
        out.append(DatagramLink(sock, frame_max))
    return out


def stdin_stream():
    """The console's stdin/stdout as the SMP serial link (USB CDC or UART0)."""
    import micropython
    from stdin_stream import StdinStream

    micropython.kbd_intr(-1)  # 0x03 in a frame is data, not Ctrl-C
    return StdinStream()


def uart_spec(spec):
    """'uart:ID:TX:RX[:BAUD]' -> (id, tx, rx, baud)."""
    p = spec.split(":")
    if p[0] != "uart" or len(p) < 4:
        raise ValueError("serial: 'stdin' or 'uart:ID:TX:RX[:BAUD]'")
    return int(p[1]), int(p[2]), int(p[3]), int(p[4]) if len(p) > 4 else 115200
