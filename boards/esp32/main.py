# Entry point on an ESP32: build the board, then run the boot stage.
# For the first `grace_ms` (config, default 3000) Ctrl-C still reaches the
# REPL, so mpremote/deploy can take the board back after a reset: once the
# receiver runs on the console, Ctrl-C is data (micropython.kbd_intr(-1)).
import time
import board

b = board.Board()
grace = int(b.config.get("grace_ms", 3000))
if grace:
    print("meterota: starting in %d ms (Ctrl-C for the REPL)" % grace)
    time.sleep_ms(grace)
import mtboot

mtboot.start(b)
