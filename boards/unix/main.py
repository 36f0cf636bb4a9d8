# Entry point of a simulated device:
#   micropython -X heapsize=128wK boards/unix/main.py STATE_DIR
# with MICROPYPATH=boards/unix:device (the device's own filesystem).
import sys
import board

b = board.Board(sys.argv[1])
import mtboot

mtboot.start(b)
