"""Hostile input to the real `meterota` CLI (issue 15, items 7, 10, 11, 12): every
case is one readable line with the exit code README's table documents, never a
traceback; values that would be accepted but mean something wrong are refused as
a bad command line; one kind of failure has one code whatever the command.

README.md's "Exit codes" table is the single truth: the codes here are looked up
in it by meaning, and errors.py must define exactly those codes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from conftest import BIN, REPO, Images, port_of, run_cli
from meterota import errors
from meterota.lab.sim import SimDevice
from meterota.store import Store


def readme_exit_codes() -> dict[int, str]:
    text = (REPO / "README.md").read_text().split("### Exit codes", 1)[1]
    return {int(m[1]): m[2] for m in re.finditer(r"^\| (\d+) \| (.+?) \|$", text.strip().split("\n\n", 1)[0], re.M)}


CODES = readme_exit_codes()


def code(meaning: str) -> int:
    """The code README documents for `meaning` (a phrase of its table row)."""
    (c,) = [c for c, text in CODES.items() if meaning in text]
    return c


USAGE = code("bad command line")
IMAGE = code("not a valid MCUboot image")
RECORDS = code("records database")
FAILURE = code("unexpected failure")


def test_readme_exit_code_table_is_what_errors_defines() -> None:
    defined = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert set(CODES) == defined, (sorted(CODES), sorted(defined))
    assert (USAGE, IMAGE, RECORDS) == (errors.EXIT_USAGE, errors.EXIT_IMAGE, errors.EXIT_RECORDS)
    assert errors.UsageError.exit_code == USAGE and errors.StoreError.exit_code == RECORDS
    assert errors.ImageError.exit_code == IMAGE


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


def cli(db: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, METEROTA_DB=str(db))
    return subprocess.run([str(BIN / "meterota"), *args], capture_output=True, text=True, timeout=120, env=env,
                          cwd=cwd)


def one_line(r: subprocess.CompletedProcess[str], exit_code: int, text: str = "") -> str:
    """The command failed with `exit_code` and said why in exactly one line."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == exit_code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("meterota: error: "), r.stderr
    assert text in lines[0], (text, lines[0])
    return lines[0]


# -- plans ---------------------------------------------------------------------------------
PLAN_HEAD = '[campaign]\nname = "hostile"\nimage = "app.bin"\n'
GROUP = '[[group]]\nname = "g"\ndevices = ["udp:127.0.0.1:9"]\n'


@pytest.fixture
def plan_dir(tmp_path: Path, images: Images) -> Path:
    (tmp_path / "app.bin").write_bytes(images.app("1.1.0").read_bytes())
    return tmp_path


@pytest.mark.parametrize("body, text", [
    # item 10: these were tracebacks
    ('group = [1, 2]\n' + PLAN_HEAD, "plan: each group must be a table ([[group]]"),
    ('group = "all"\n' + PLAN_HEAD, "plan: groups are [[group]] tables"),
    (PLAN_HEAD + 'retries = 3\n' + GROUP, "campaign.retries must be a table"),
    # item 11: these were accepted, or said the wrong thing
    (PLAN_HEAD + 'abort = "yes"\n' + GROUP, "campaign.abort must be a table"),
    (PLAN_HEAD + 'daily = "01:99-02:00"\n' + GROUP, "campaign.daily: '01:99-02:00' is not a valid window"),
    (PLAN_HEAD + 'duration = nan\n' + GROUP, "campaign.duration must be a positive, finite number"),
    (PLAN_HEAD + 'device_timeout = inf\n' + GROUP, "campaign.device_timeout must be a positive, finite"),
    (PLAN_HEAD + '[[group]]\nname = 5\ndevices = ["udp:127.0.0.1:9"]\n', "name must be a non-empty string"),
    (PLAN_HEAD + '[[group]]\nname = "g"\n[[group.concentrators]]\naddress = "udp:127.0.0.1:9"\n'
     'meters = ["meter-0101", "meter-0101"]\n', "meter meter-0101 is listed twice"),
    (PLAN_HEAD + '[[group]]\nname = "a"\n[[group.concentrators]]\naddress = "udp:127.0.0.1:9"\n'
     'meters = ["meter-0101"]\n[[group]]\nname = "b"\n[[group.concentrators]]\naddress = "udp:127.0.0.2:9"\n'
     'meters = ["meter-0101"]\n', "meter meter-0101 is listed twice"),
])
def test_a_bad_plan_is_one_line_and_a_usage_error(plan_dir: Path, db: Path, body: str, text: str) -> None:
    (plan_dir / "plan.toml").write_text(body)
    one_line(cli(db, "campaign", "run", str(plan_dir / "plan.toml")), USAGE, text)


def test_a_binary_plan_file_is_one_line(tmp_path: Path, db: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_bytes(bytes(range(256)) * 4)
    one_line(cli(db, "campaign", "run", str(plan)), USAGE, "not UTF-8 text")


# -- the records database ------------------------------------------------------------------
@pytest.mark.parametrize("what", ["directory", "/dev/null", "not sqlite"])
def test_a_records_database_that_cannot_be_one_is_one_line(tmp_path: Path, what: str) -> None:
    if what == "directory":
        target = tmp_path / "dir.db"
        target.mkdir()
    elif what == "/dev/null":
        target = Path("/dev/null")
    else:
        target = tmp_path / "notes.txt"
        target.write_text("these are not the records you are looking for\n" * 100)
    for args in (["records"], ["keys", "add", "meter-1", "11" * 32], ["campaign", "list"]):
        one_line(run_cli("meterota", "--db", str(target), *args), RECORDS, f"records database {target}")
    env_r = cli(target, "records")  # $METEROTA_DB names it the same way
    one_line(env_r, RECORDS, f"records database {target}")


# -- argument values -----------------------------------------------------------------------
def test_wrong_values_are_refused_before_anything_is_opened(tmp_path: Path, db: Path, images: Images) -> None:
    app = str(images.app("1.1.0"))
    cases = [
        (["info", "--port", "/dev/null", "--baud", "99999999999"], "argument --baud"),
        (["test", "--port", "/dev/null", "--hash", "zz"], "argument --hash: 'zz' is not a hex image hash"),
        (["test", "--port", "/dev/null", "--hash", "ab" * 31], "an image hash is 32 bytes"),
        (["upgrade", "--port", "/dev/null", app, "--reset-timeout", "-1"], "argument --reset-timeout"),
        (["info", "--port", "/dev/null", "--timeout", "0"], "argument --timeout"),
        (["info", "--port", "/dev/null", "--timeout", "-1"], "argument --timeout"),
        (["info", "--port", "/dev/null", "--timeout", "nan"], "argument --timeout"),
        (["info", "--port", "/dev/null", "--retries", "-1"], "argument --retries"),
        (["info", "--udp", "127.0.0.1:99999"], "the port must be a number from 1 to 65535"),
        (["info", "--udp", "127.0.0.1:0"], "the port must be a number from 1 to 65535"),
        (["upgrade", "--via", "udp:127.0.0.1:70000", "--meter", "m", app], "the port must be"),
        (["keys", "add", "", "11" * 32], "argument device: '' is not a device id"),
        (["keys", "add", " meter-1", "11" * 32], "is not a device id"),
        (["job", "create", "--port", "/dev/null", app, "--priority", "300"], "argument --priority"),
        (["job", "create", "--port", "/dev/null", app, "--job-retries", "-1"], "argument --job-retries"),
        (["campaign", "run", "plan.toml", "--timeout", "-2"], "argument --timeout"),
        (["campaign", "abort", "c1", "--retries", "-1"], "argument --retries"),
        (["image", "build", "-o", "/missing/dir/x.bin", "--version", "1.0.0"], "directory /missing/dir does not exist"),
        (["image", "keygen", "-o", "/missing/k.pem"], "directory /missing does not exist"),
        (["image", "info", app, "--key", "/missing"], "argument --key: /missing: no such file"),
        (["image", "build", "--key", "/missing.pem", "-o", "x.bin", "--version", "1.0.0"], "no such file"),
        (["sim", "--dir", app], f"argument --dir: {app}: not a directory"),
        (["report", "c1", "-o", "/missing/dir/r.html"], "does not exist"),
    ]
    for args, text in cases:
        one_line(cli(db, *args, cwd=tmp_path), USAGE, text)
    # Nothing was recorded: a refused command line does not reach the device or the records.
    assert not db.exists() or not list(Store(db).outcomes(None, 10))


def test_no_device_given_is_a_usage_error(db: Path, images: Images) -> None:
    for args in (["info"], ["images"], ["confirm"], ["upgrade", str(images.app("1.1.0"))], ["meters"]):
        one_line(cli(db, *args), USAGE, "no device given: use --port PORT or --udp HOST[:PORT]")
    one_line(cli(db, "upgrade", "--via", "/dev/null", str(images.app("1.1.0"))), USAGE, "--via needs --meter")


def test_an_unknown_campaign_is_the_same_code_for_every_command(tmp_path: Path, db: Path, images: Images) -> None:
    app = str(images.app("1.1.0"))
    with Store(db):
        pass  # a records database without that campaign
    for args in (["campaign", "status", "nope"], ["campaign", "abort", "nope"], ["campaign", "resume", "nope"],
                 ["export", "nope"], ["report", "nope", "-o", str(tmp_path / "r.html")],
                 ["workorders", "--campaign", "nope"], ["upgrade", "--port", "/dev/null", app, "--campaign", "nope"],
                 ["upgrade", "--via", "/dev/null", "--meter", "m", app, "--campaign", "nope"],
                 ["job", "create", "--port", "/dev/null", app, "--campaign", "nope"],
                 ["job", "results", "--port", "/dev/null", "1", "--campaign", "nope"]):
        one_line(cli(db, *args), USAGE, "no campaign nope")


# -- a corrupt image: one code everywhere --------------------------------------------------
def test_a_corrupt_image_is_the_image_code_on_every_path(make_device: Callable[..., SimDevice], tmp_path: Path,
                                                        db: Path, images: Images) -> None:
    bad = tmp_path / "corrupt.bin"
    data = bytearray(images.app("1.1.0").read_bytes())
    data[200] ^= 0x55  # inside the hashed payload: the hash TLV no longer matches
    bad.write_bytes(bytes(data))
    dev = make_device("serial")  # a reachable device: the image is refused before it is touched
    with Store(db) as st:
        st.set_key(dev.device_id, dev.key)
    gen = dev.ready_generation()
    r = cli(db, "image", "info", str(bad))
    assert r.returncode == IMAGE and "MISMATCH" in r.stdout and "Traceback" not in r.stderr
    one_line(cli(db, "upgrade", *port_of(dev), str(bad)), IMAGE, "the file is corrupt")
    one_line(cli(db, "upgrade", "--via", dev.address[len("serial:"):], "--meter", "meter-0101", str(bad)),
             IMAGE, "the file is corrupt")
    one_line(cli(db, "job", "create", *port_of(dev), str(bad)), IMAGE, "the file is corrupt")
    (tmp_path / "plan.toml").write_text(f'[campaign]\nname = "c"\nimage = "{bad}"\n{GROUP}')
    one_line(cli(db, "campaign", "run", str(tmp_path / "plan.toml")), IMAGE, "the file is corrupt")
    (tmp_path / "plan.toml").write_text(f'[campaign]\nname = "c"\nimage = "{tmp_path / "gone.bin"}"\n{GROUP}')
    one_line(cli(db, "campaign", "run", str(tmp_path / "plan.toml")), IMAGE, "cannot read the plan's image")
    one_line(cli(db, "upgrade", *port_of(dev), str(tmp_path / "gone.bin")), IMAGE, "cannot read image")
    assert dev.ready_generation() == gen and not list(Store(db).outcomes(None, 10))  # nothing reached the device

    # -- item 10: a reader that went away (`meterota info | head -2`): quiet, no traceback ----
    for args in (["info", *port_of(dev)], ["image", "info", str(images.app("1.1.0"))], ["--help"]):
        rd, wr = os.pipe()
        os.close(rd)  # the reader is gone before the first byte
        try:
            p = subprocess.run([str(BIN / "meterota"), *args], stdout=wr, stderr=subprocess.PIPE, text=True,
                               timeout=60, env=dict(os.environ, METEROTA_DB=str(db)))
        finally:
            os.close(wr)
        assert p.returncode == 0 and p.stderr == "", (args, p.returncode, p.stderr)


# -- item 7: abort.threshold = 0 -----------------------------------------------------------
def test_abort_threshold_zero_aborts_on_a_failure_not_on_a_success(tmp_path: Path, images: Images) -> None:
    from meterota.campaign import plan as pl
    from meterota.campaign.ledger import Ledger
    from meterota.campaign.runner import Runner, create

    doc = {"campaign": {"name": "t0", "image": str(images.app("1.1.0")), "abort": {"threshold": 0}},
           "group": [{"name": "g", "devices": ["udp:127.0.0.1:9", "udp:127.0.0.2:9", "udp:127.0.0.3:9"]}]}
    plan = pl.parse(doc, tmp_path)
    assert plan.abort.threshold == 0
    with Store(tmp_path / "r.db") as st:
        led = Ledger(st)
        cid = create(led, plan, None)
        run = Runner(st, led, cid)
        led.finish_device(cid, "udp:127.0.0.1:9", "OK", "upgraded", final=True)
        run._check_abort()
        assert not run.stopping() and run.end_state is None  # 0 of 1 failed: not over a threshold of 0
        led.finish_device(cid, "udp:127.0.0.2:9", "OK", "upgraded", final=True)
        run._check_abort()
        assert not run.stopping()
        led.finish_device(cid, "udp:127.0.0.3:9", "KO", "reverted", final=True)
        run._check_abort()
        assert run.end_state == "aborted" and "1 of 3" in run.end_reason  # any failure aborts
    # The same rule for every threshold: at or over it, and never without a failure.
    assert not pl.Abort(threshold=0.0).tripped(0, 5) and pl.Abort(threshold=0.0).tripped(1, 5)
    assert pl.Abort(threshold=0.5, min_finished=4).tripped(2, 4) and not pl.Abort(0.5, 4).tripped(2, 3)


def test_a_file_that_cannot_be_written_is_one_line(db: Path, tmp_path: Path) -> None:
    """What only fails when written (here: /proc takes no new files, even from root) reaches the
    top-level handler: one line naming the file, the code for a file on this host."""
    for args in (["image", "keygen", "-o", "/proc/meterota-k.pem"],
                 ["image", "build", "--version", "1.0.0", "-o", "/proc/meterota-x.bin"],
                 ["workorders", "-o", "/proc/meterota-w.csv"]):
        one_line(cli(db, *args, cwd=tmp_path), FAILURE, "/proc/meterota-")
