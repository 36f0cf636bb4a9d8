"""CLI surface that needs no device: help, deploy refusals, exit codes."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli


def test_deploy_refuses_unknown_boards_and_missing_ports_in_one_line(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    r = run_cli("meterota", "--db", db, "deploy", "--port", "/dev/ttyNOPE", "--board", "stm32", "--id", "m1")
    assert r.returncode == 2 and r.stderr.strip() == "meterota: error: unknown board 'stm32' (known: esp32, rp2)"
    r = run_cli("meterota", "--db", db, "deploy", "--port", "/dev/ttyNOPE", "--board", "rp2", "--id", "m1")
    errs = [x for x in r.stderr.splitlines() if x.startswith("meterota: error:")]
    assert r.returncode == 3 and len(errs) == 1 and "no such port" in errs[0] and "Traceback" not in r.stderr


def test_every_command_has_help() -> None:
    for cmd in ("sim", "image", "info", "images", "upgrade", "upload", "test", "confirm", "reset", "erase",
                "confirmation", "deploy", "keys", "records"):
        r = run_cli("meterota", cmd, "--help", check=True)
        assert "usage: meterota" in r.stdout
