"""Every command README.md shows is run by a test, so a documented command that
does nothing, or no longer parses, fails CI (issue 15, item 15).

* each `make TARGET` README names has a rule with a recipe of its own;
* each `meterota ...` line of README's code blocks parses with the real parser
  (placeholders such as ID, JOB, [--opt X] and a|b filled in);
* each command of README's command table answers `--help`;
* the walk-through block runs as written against a simulated device, and its
  sample output matches what the commands print."""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import BIN, REPO
from meterota.cli import build_parser
from meterota.lab.sim import SimDevice

README = (REPO / "README.md").read_text()


def code_blocks(text: str) -> Iterator[tuple[str, str]]:
    """(heading, block) for every ```sh block."""
    heading = ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```sh\n(.*?)^```", text, re.S | re.M):
        if m.group(1):
            heading = m.group(1)
        else:
            yield heading, m.group(2)


def commands(block: str) -> Iterator[str]:
    """The commands of a shell block: comments dropped, continuations joined, `;` split."""
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in line.split(";"):
            if part.strip():
                yield part.strip()


MAKE_TARGETS = sorted(set(re.findall(r"\bmake ([a-z][\w-]*)", README)))
BLOCK_COMMANDS = [c for _h, b in code_blocks(README) for c in commands(b)]
METEROTA_EXAMPLES = [c for c in BLOCK_COMMANDS if c.startswith("meterota ")]

PLACEHOLDERS = {"ID": "feeder-12", "JOB": "1", "TEXT": "why", "FILE": "out.txt", "HEXKEY": "11" * 32,
                "HEX": "11" * 32}


def fill(cmd: str) -> list[str]:
    """README notation -> a concrete argv: [optional] parts dropped, a|b -> a, PLACEHOLDER -> value."""
    cmd = re.sub(r"\[[^\]]*\]", " ", cmd)
    out = []
    for tok in shlex.split(cmd):
        tok = tok.split("|")[0]
        out.append(PLACEHOLDERS.get(tok, tok))
    return out[1:]  # without "meterota"


def test_readme_names_the_make_targets_and_commands_it_should() -> None:
    # The extraction itself: if README is reorganised so that nothing is found, this fails.
    assert {"demo", "test", "bench", "scale", "hil"} <= set(MAKE_TARGETS)
    assert len(METEROTA_EXAMPLES) >= 25


def _rules() -> dict[str, list[str]]:
    """target -> its recipe lines, from the Makefile's text."""
    rules: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([\w$().-]+(?:\s+[\w$().-]+)*)\s*:(?!=)", line)
        if m and not line.startswith(("\t", ".PHONY")):
            cur = []
            for t in m.group(1).split():
                rules[t] = cur
        elif line.startswith("\t") and cur is not None:
            cur.append(line.strip())
        elif not line.strip() or line.startswith("#"):
            continue
        else:
            cur = None
    return rules


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_every_make_target_readme_shows_does_something(target: str) -> None:
    recipe = _rules().get(target)
    assert recipe, f"`make {target}` is in README but the Makefile has no recipe for it (it would do nothing)"
    args = ["PORT=/dev/ttyACM0", "BOARD=rp2"] if target == "hil" else []
    p = subprocess.run(["make", "-n", "-B", target, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Nothing to be done" not in p.stdout + p.stderr and p.stdout.strip(), p.stdout


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("example", METEROTA_EXAMPLES)
def test_every_meterota_example_in_readme_parses(example: str, in_tmp: Path) -> None:
    argv = fill(example)
    for tok in argv:  # the files an example names exist (the parser checks keys and outputs' directories)
        if re.search(r"\.(bin|pem|toml)$", tok):
            Path(tok).parent.mkdir(parents=True, exist_ok=True)
            Path(tok).write_bytes(b"")
    err = io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"README example `{example}` does not parse (exit {e.code}): {err.getvalue().strip()}")
    assert callable(getattr(args, "fn", None)), example


def _table_commands() -> list[list[str]]:
    """The command paths of README's command table: `meterota job create|status` -> [job, create], [job, status]."""
    table = README.split("### Commands", 1)[1].split("\n\n", 1)[0]
    paths: list[list[str]] = []
    for row in table.splitlines()[2:]:
        first = row.split(" | ")[0]
        for span in re.findall(r"`([^`]+)`", first):
            words = span.replace("\\|", "|").split()
            if words[0] == "meterota":
                words = words[1:]
            path: list[list[str]] = []
            for w in words:
                if w.startswith(("-", "[")) or w.isupper() or "." in w:
                    break
                path.append(w.split("|"))
            if len(path) == 1:
                paths += [[a] for a in path[0]]
            elif path:
                paths += [[path[0][0], b] for b in path[1]]
    return paths


def test_every_command_in_readmes_table_has_help() -> None:
    paths = _table_commands()
    assert ["campaign", "abort"] in paths and ["job", "results"] in paths and ["keys", "add"] in paths
    for path in paths:
        out = io.StringIO()
        with pytest.raises(SystemExit) as e, redirect_stdout(out), redirect_stderr(io.StringIO()):
            build_parser().parse_args([*path, "--help"])
        assert e.value.code == 0 and "usage: meterota" in out.getvalue(), path


@pytest.mark.usefixtures("sim_only")  # README's walk-through is on `meterota sim`'s device and image
def test_the_walk_through_runs_as_written(make_device: Callable[..., SimDevice], tmp_path: Path) -> None:
    """README's walk-through, command by command, on a simulated device in place of
    `meterota sim` (whose device it stands for): the outputs are what README shows."""
    (block,) = [b for h, b in code_blocks(README) if h.startswith("## Walk-through")]
    cmds = list(commands(block))
    assert cmds[0] == "meterota sim --count 1"
    dev = make_device("serial", name="meter-0001")
    port = dev.address[len("serial:"):]
    env = dict(os.environ, METEROTA_DB=str(tmp_path / "records.db"))

    def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
        argv = [str(REPO / a) if (REPO / a).is_dir() else a for a in argv]
        return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)

    assert run(["meterota", "keys", "add", dev.device_id, dev.key.hex()]).returncode == 0  # what `sim` does
    outputs = {}
    for c in cmds[1:]:
        argv = shlex.split(c.replace("/dev/pts/3", port))
        p = run(argv)
        assert p.returncode == 0 and p.stdout.strip(), f"README walk-through `{c}`: exit {p.returncode}\n{p.stderr}"
        outputs[" ".join(argv[:2])] = p.stdout
    # The sample output README prints under `meterota upgrade`.
    assert re.search(r"^meter-0001: OK 1\.0\.0\+0 -> 1\.1\.0\+0 in [\d.]+ s, upload [\d.]+ kB/s$",
                     outputs["meterota upgrade"], re.M), outputs["meterota upgrade"]
    assert re.search(r"confirmation #\d+: OK \(confirmed\), MAC verified", outputs["meterota upgrade"])
    assert "1.1.0" in outputs["smpmgr --port"]
    assert "version      1.1.0" in outputs["meterota image"]


if __name__ == "__main__":  # pragma: no cover - list what the test extracts
    print("\n".join(MAKE_TARGETS), "\n".join(METEROTA_EXAMPLES), sep="\n", file=sys.stdout)
