"""The records database on its two backends: selection by --db and
$METEROTA_DB, schema versions (an older database migrated, a newer one
refused), and the one-line refusals with exit code 12 (unreachable server,
wrong credentials)."""

from __future__ import annotations

import json
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli
from meterota.campaign import ledger as ledger_mod
from meterota.campaign.ledger import Ledger
from meterota.db import Database
from meterota.store import MIGRATIONS as STORE_MIGRATIONS
from meterota.store import Outcome, Store

EXIT_DATABASE = 12


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.strip()]


@pytest.mark.pg_core
def test_unreachable_server_is_one_line_and_exit_10(tmp_path: Path) -> None:
    nowhere = tempfile.mkdtemp(prefix="meterota-nopg-")  # a socket folder with no server in it
    p = run_cli("meterota", "--db", f"postgresql://meterota:x@/db?host={nowhere}", "campaign", "list")
    assert p.returncode == EXIT_DATABASE
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("meterota: error: PostgreSQL") and "unreachable" in lines[0]
    assert ":x@" not in lines[0] and ":***@" in lines[0]  # the password is not printed


@pytest.mark.pg_core
def test_wrong_credentials_are_refused(pg_server: Any) -> None:
    url = pg_server.new_database()
    bad = url.replace(":meterota-test@", ":wrong@")
    p = run_cli("meterota", "--db", bad, "records")
    assert p.returncode == EXIT_DATABASE
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "refused the credentials" in lines[0] and "wrong" not in lines[0]


@pytest.mark.pg_core
def test_environment_selects_postgresql(pg_server: Any) -> None:
    url = pg_server.new_database()
    r = run_cli("meterota", "keys", "add", "meter-9", "11" * 32, env={"METEROTA_DB": url})
    assert r.returncode == 0, r.stderr
    with Store(url) as st:
        assert st.dialect == "postgresql" and st.key("meter-9") == bytes.fromhex("11" * 32)


@pytest.mark.pg_core
def test_store_and_ledger_same_on_both_backends(db_target: str) -> None:
    with Store(db_target) as st:
        led = Ledger(st)
        assert st.db.schema_version("store") == len(STORE_MIGRATIONS)
        assert st.db.schema_version("ledger") == len(ledger_mod.MIGRATIONS)
        led.create_campaign("c", "n", {"k": 1}, None, "ab" * 32, "1.0.0")
        assert led.add_target("c", "t1", "g", "direct", address="t1", image_hash="ab" * 32, version="1.0.0")
        assert not led.add_target("c", "t1", "g", "direct", address="t1", image_hash="ab" * 32, version="1.0.0")
        # One transaction over the store and the ledger: all or nothing.
        with pytest.raises(RuntimeError):
            with st.transaction():
                st.add(Outcome("t1", "t1", None, "1.0.0", "ab" * 32, "ERROR", "cut", 1, 1.0, 2.0, None, None, False, "c"))
                led.finish_device("c", "t1", "OK", "", final=True, record=b"r", mac=b"m", verified=True)
                raise RuntimeError("cut")
        assert list(st.outcomes()) == [] and led.device_row("c", "t1")["state"] == "pending"  # type: ignore[index]
        with st.transaction():
            st.add(Outcome("t1", "t1", None, "1.0.0", "ab" * 32, "ERROR", "cut", 1, 1.0, 2.0, None, None, False, "c"))
            led.finish_device("c", "t1", "OK", "", final=True, record=b"r", mac=b"m", verified=True)
        row = led.device_row("c", "t1")
        assert row is not None and row["state"] == "OK" and bytes(row["record"]) == b"r"
        assert led.counts("c") == {"": {"OK": 1}}
        # Leases: a unit is taken by one worker only.
        led.add_unit("c", "t1", "g", 0, "direct")
        a = led.claim_unit("host:1:a", 30.0, ["c"])
        assert a is not None and a["unit"] == "t1"
        assert led.claim_unit("host:2:b", 30.0, ["c"]) is None
        assert led.renew_leases("host:1:a", 30.0) == {("c", "t1")}
        assert led.renew_leases("host:2:b", 30.0) == set()
        # A dead worker's leases freed at once (its own host saw it die): whoever takes the unit
        # next still knows whose it was, so the takeover is in the timeline.
        assert led.release_owner("host:1:a") == 1
        b = led.claim_unit("host:2:b", 30.0, ["c"])
        assert b is not None and b["previous_owner"] == "host:1:a" and b["leases"] == 2


V1_LEDGER = ledger_mod.MIGRATIONS[0]


def test_older_sqlite_database_is_migrated(tmp_path: Path) -> None:
    """A records file from before schema versions (store and ledger v1) is adopted
    and migrated: its campaign is still there and gets its units."""
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(STORE_MIGRATIONS[0] + V1_LEDGER)
    con.execute("INSERT INTO campaigns(id, name, plan, image_hash, version, state, created) "
                "VALUES('old', 'old', '{}', 'ab', '1.0.0', 'done', 1.0)")
    con.commit()
    con.close()
    p = run_cli("meterota", "--db", str(path), "campaign", "list", "--json")
    assert p.returncode == 0, p.stderr
    assert [c["id"] for c in json.loads(p.stdout)] == ["old"]
    db = Database(path)
    assert db.schema_version("ledger") == len(ledger_mod.MIGRATIONS)
    assert db.rows("SELECT COUNT(*) AS n FROM campaign_units") == [{"n": 0}]


@pytest.mark.pg_core
def test_newer_schema_is_refused(db_target: str) -> None:
    with Store(db_target) as st:
        Ledger(st)
        st.db.run(lambda: st.db.execute("UPDATE meterota_schema SET version=99 WHERE component='ledger'"))
    p = run_cli("meterota", "--db", db_target, "campaign", "list")
    assert p.returncode == EXIT_DATABASE
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "ledger schema is version 99, newer than this meterota knows" in lines[0]


@pytest.mark.pg_core
def test_a_lost_server_connection_is_waited_back(pg_server: Any) -> None:
    """A method of the store runs again once the server is back; a caller's own
    transaction cut by the loss is rolled back and says so (TransactionLost)."""
    from meterota.db import TransactionLost

    url = pg_server.new_database()
    with Store(url) as st:
        st.set_key("m", b"k" * 32)
        pg_server.stop("fast")
        pg_server.start()
        assert st.key("m") == b"k" * 32  # the broken connection is replaced, the read runs again
        with pytest.raises(TransactionLost, match="lost inside a transaction"):
            with st.transaction() as tx:
                tx.execute("UPDATE devices SET board='x' WHERE id=?", ("m",))
                pg_server.stop("fast")
                pg_server.start()
                tx.execute("SELECT 1")
        assert st.db.rows("SELECT board FROM devices") == [{"board": None}]  # nothing of it committed
