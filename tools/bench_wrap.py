"""Run the real smpmgr or mpremote CLI in this process with its transfer phase timed.

    python tools/bench_wrap.py TIMING.json smpmgr   --port P image upload FILE --slot 1
    python tools/bench_wrap.py TIMING.json mpremote connect P resume cp FILE :dest

The CLI runs unchanged (its own argument parsing, transport, progress bar); only
the one method that moves the image is wrapped to note when it starts and ends:
smpclient's `SMPClient.upload` (first upload request to the last reply) and
mpremote's `Transport.fs_writefile` (open, every chunk, close). Start-up and
connection time are therefore left out, as they are for meterota, whose
`SMPClient.upload` tools/bench.py times directly. The timing is written to
TIMING.json as {"seconds": s, "bytes": n}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _record(path: Path, t0: float, n: int) -> None:
    path.write_text(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n}))


def smpmgr(out: Path, argv: list[str]) -> Any:
    import smpclient
    from smpmgr.main import app

    orig = smpclient.SMPClient.upload

    async def timed(self: Any, image: bytes, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        async for off in orig(self, image, *a, **k):
            yield off
        _record(out, t0, len(image))

    smpclient.SMPClient.upload = timed  # type: ignore[assignment]
    sys.argv = ["smpmgr", *argv]
    return app()


def mpremote(out: Path, argv: list[str]) -> Any:
    from mpremote import transport
    from mpremote.main import main

    orig = transport.Transport.fs_writefile

    def timed(self: Any, dest: str, data: bytes, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        r = orig(self, dest, data, *a, **k)
        _record(out, t0, len(data))
        return r

    transport.Transport.fs_writefile = timed  # type: ignore[method-assign]
    sys.argv = ["mpremote", *argv]
    return main()


if __name__ == "__main__":
    timing, tool, *rest = sys.argv[1:]
    fn = {"smpmgr": smpmgr, "mpremote": mpremote}[tool]
    sys.exit(fn(Path(timing), rest))
