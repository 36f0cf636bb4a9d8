# Wi-Fi station + the SMP UDP socket, shared by the esp32 and rp2 (W) boards.
import time


def udp_socket(cfg):
    """Join config["wifi"] and bind UDP on config["udp_port"] (1337); None when
    Wi-Fi is not configured, the port has no radio, or it cannot connect."""
    w = cfg.get("wifi")
    if not w or not w.get("ssid"):
        return None
    try:
        import network
    except ImportError:
        print("meterota: no network module (no radio on this board), UDP off")
        return None
    import socket

    wlan = network.WLAN(network.WLAN.IF_STA)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(w["ssid"], w.get("key", ""))
        t0 = time.ticks_ms()
        while not wlan.isconnected():
            if time.ticks_diff(time.ticks_ms(), t0) > int(w.get("timeout_ms", 20000)):
                print("meterota: wifi", w["ssid"], "not connected, status", wlan.status())
                return None
            time.sleep_ms(100)
    if w.get("pm_none"):
        wlan.config(pm=wlan.PM_NONE)
    port = int(cfg.get("udp_port", 1337))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(socket.getaddrinfo("0.0.0.0", port)[0][-1])
    s.setblocking(False)
    print("meterota: udp", wlan.ifconfig()[0], port)
    return s
