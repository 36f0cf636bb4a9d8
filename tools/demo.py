"""`make demo`: the whole story on the simulator, every device under MicroPython.

A campaign upgrades one meter NIC on a direct serial link (the pilot group)
and then 2 concentrators x 10 meters on their UDP links. One meter is off the
network: it ends UNREACHABLE and becomes a field work order; the technician
upgrades it on site through its optical port, which closes the work order.
Ends with the CIM export and the HTML report's path."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "host"))

from meterota import cli  # noqa: E402
from meterota.lab.fleet import Fleet, FleetOptions, meter_id  # noqa: E402
from meterota.lab.sim import SimDevice  # noqa: E402
from meterota.store import Store  # noqa: E402

WORK = REPO / ".meterota" / "demo"
OFF_NETWORK = meter_id(2, 7)

PLAN = """\
[campaign]
name = "feeder 12 firmware 1.1.0"
image = "meter-app-1.1.0.bin"
priority = 5
concurrency = 2
device_timeout = 30
duration = "1h"
retry_delay = 1

[campaign.retries]
unreachable = 1
ko = 0

[campaign.abort]
threshold = 0.3
min_finished = 5

[[group]]
name = "pilot"
success_threshold = 1.0
devices = ["{direct}"]

[[group]]
name = "feeder-12"
success_threshold = 0.8
[[group.concentrators]]
address = "{c1}"
[[group.concentrators]]
address = "{c2}"
"""


def say(text: str) -> None:
    print(f"\n{text}", flush=True)


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    db = WORK / "records.db"
    image = WORK / "meter-app-1.1.0.bin"
    say("1. Build the application bundle (littlefs) and sign it as an MCUboot image (imgtool)")
    rc = cli.main(["image", "build", str(REPO / "tools" / "demo_app"), "--version", "1.1.0", "-o", str(image)])
    if rc:
        return rc

    say(f"2. Start the simulated network: 2 concentrators x 10 meters on UDP ({OFF_NETWORK} off the network),\n"
        "   and one meter NIC on a serial link; factory image 1.0.0 everywhere")
    fleet = Fleet(WORK / "fleet", 2, 10, FleetOptions(unreachable={OFF_NETWORK}, meter_reset_s=8))
    direct = SimDevice(WORK / "meter-0001", device_id="meter-0001", transport="serial")
    onsite: SimDevice | None = None
    try:
        fleet.start()
        direct.start()
        with Store(db) as st:  # the head-end's key registry: one HMAC key per device
            for d in fleet.meters + fleet.concentrators + [direct]:
                st.set_key(d.device_id, d.key, "unix", d.address)
        for c in fleet.concentrators:
            print(f"   {c.device_id} at {c.address}")
        print(f"   {direct.device_id} at {direct.address}")
        plan = WORK / "plan.toml"
        plan.write_text(PLAN.format(direct=direct.address, c1=fleet.concentrators[0].address,
                                    c2=fleet.concentrators[1].address))

        say(f"3. meterota campaign run {plan.relative_to(REPO)}")
        print(plan.read_text())
        cid = "feeder-12"
        rc = cli.main(["--db", str(db), "campaign", "run", str(plan), "--id", cid])
        if rc not in (0, 5):  # 5: finished, with devices left for a field visit
            return rc

        say(f"4. meterota workorders --campaign {cid}")
        cli.main(["--db", str(db), "workorders", "--campaign", cid])

        say(f"5. The technician reaches {OFF_NETWORK} on site and upgrades it through its optical port:\n"
            f"   meterota upgrade --port PORT {image.name} --campaign {cid}")
        onsite = SimDevice(WORK / "onsite", device_id=OFF_NETWORK, transport="serial")
        onsite.start()
        with Store(db) as st:
            st.set_key(OFF_NETWORK, onsite.key, "unix", onsite.address)
        rc = cli.main(["--db", str(db), "upgrade", "--port", onsite.address.split(":", 1)[1], str(image),
                       "--campaign", cid])
        if rc:
            return rc

        say(f"6. meterota campaign status {cid}")
        cli.main(["--db", str(db), "campaign", "status", cid])
        cim = WORK / f"{cid}.cim.xml"
        report = WORK / f"{cid}.html"
        say("7. Exports for the head-end (CSV, JSON, IEC 61968-9 style EndDeviceEvents) and the report")
        for fmt, ext in (("csv", "csv"), ("json", "json"), ("cim", "cim.xml")):
            rc = cli.main(["--db", str(db), "export", cid, "--format", fmt, "-o", str(WORK / f"{cid}.{ext}")])
            if rc:
                return rc
        rc = cli.main(["--db", str(db), "report", cid, "-o", str(report)])
        if rc:
            return rc
        say(f"Open the report in a browser: {report}\n(CIM export: {cim})")
        return 0
    finally:
        if onsite is not None:
            onsite.stop()
        direct.stop()
        fleet.stop()


if __name__ == "__main__":
    sys.exit(main())
