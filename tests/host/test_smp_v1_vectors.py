"""The SMP v1 error-translation facts (tests/device/vectors/smp_v1_errors.json,
from Zephyr's img_mgmt_translate_error_code) agree with the host's SMP library:
every image-group code and every MCUmgr code has the name and number that
smpclient's `smp` package gives it. The device test checks the translation."""

from __future__ import annotations

import json
from pathlib import Path

from smp.error import MGMT_ERR
from smp.image_management import IMG_MGMT_ERR

V1 = json.loads((Path(__file__).parents[1] / "device" / "vectors" / "smp_v1_errors.json").read_text())


def test_v1_vectors_name_the_codes_as_the_smp_library_does() -> None:
    assert V1["group"] == 1
    for name, value in V1["mgmt_err"].items():
        assert MGMT_ERR[name].value == value, name
    known = {e.value: e.name for e in IMG_MGMT_ERR}
    for e in V1["img_mgmt_err"]:
        assert e["v1"] in V1["mgmt_err"], e
        if e["rc"] in known:  # the library may lag Zephyr's newest codes
            assert known[e["rc"]] == e["name"], e
    assert [e["rc"] for e in V1["img_mgmt_err"]] == list(range(1, len(V1["img_mgmt_err"]) + 1))
