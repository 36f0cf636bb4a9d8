# Entry point on an ESP32: build the board, then run the boot stage
# (mtboot.run waits `grace_ms` first so the REPL can still be reached).
import board
import mtboot

mtboot.run(board.Board())
