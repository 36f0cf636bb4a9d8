"""`make demo`: build an application image, start a simulated meter NIC under
MicroPython, upgrade it with `meterota upgrade`, print the verified record."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import cli  # noqa: E402
from meterota.sim import SimDevice  # noqa: E402
from meterota.store import Store  # noqa: E402

WORK = REPO / ".meterota" / "demo"


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    db = WORK / "records.db"
    image = WORK / "meter-app-1.1.0.bin"
    print("1. Build the application bundle (littlefs) and sign it as an MCUboot image (imgtool)")
    rc = cli.main(["image", "build", str(REPO / "tools" / "demo_app"), "--version", "1.1.0", "-o", str(image)])
    if rc:
        return rc
    print("\n2. Start a simulated meter NIC (device code under MicroPython, factory image 1.0.0 in slot A)")
    with SimDevice(WORK / "meter-0001", device_id="meter-0001", transport="serial") as dev:
        with Store(db) as st:
            st.set_key(dev.device_id, dev.key, "unix", dev.address)
        port = dev.address.split(":", 1)[1]
        print(f"   {dev.device_id} at {dev.address}; its HMAC key is in {db}")
        print(f"\n3. meterota upgrade --port {port} {image.name}")
        rc = cli.main(["--db", str(db), "upgrade", "--port", port, str(image)])
        if rc:
            return rc
        print("\n4. The device's confirmation record, fetched and verified again")
        rc = cli.main(["--db", str(db), "confirmation", "--port", port])
        print("\n5. Recorded outcome")
        cli.main(["--db", str(db), "records"])
    return rc


if __name__ == "__main__":
    sys.exit(main())
