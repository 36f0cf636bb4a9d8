# meterota — every target installs what it needs into .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STUBS  := $(VENV)/mpstubs/.done

.PHONY: all venv chromium postgresql mosquitto test test-all test-pg demo bench powercut fuzz scale scale-workers fanout hil hil-sim clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The official MicroPython stubs of each port, for the type check of device/ and boards/.
$(STUBS): $(STAMP) tools/install_stubs.sh
	sh tools/install_stubs.sh $(BIN)/python
	touch $(STUBS)

venv: $(STAMP) $(STUBS)

# Headless Chromium renders the campaign report in tests/host/test_report.py (Debian's package).
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	then :; else echo "make chromium: could not install Debian's chromium (need root and apt); tests/host/test_report.py will skip (fail under CI)"; fi

# A real MQTT broker for tests/system/test_mqtt.py (Debian's package; the tests start their own
# instances on free loopback ports with their own configuration, never the system service).
mosquitto:
	@if [ -x /usr/sbin/mosquitto ] && command -v mosquitto_passwd >/dev/null && command -v openssl >/dev/null; then :; \
	elif apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto openssl; \
	then :; else echo "make mosquitto: could not install Debian's mosquitto (need root and apt); tests/system/test_mqtt.py will fail"; fi

# A real PostgreSQL server (Debian's package) for the tests of the shared ledger: the tests run
# initdb + pg_ctl themselves in a temporary folder (tests/pg.py); no system cluster is used.
postgresql:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	then :; else echo "make postgresql: could not install Debian's postgresql (need root and apt)"; exit 1; fi

# Every test on SQLite but those marked slow; of the PostgreSQL variants, those marked pg_core.
# make test-all runs every test there is (make test-pg: the PostgreSQL half alone).
test: venv chromium postgresql mosquitto
	$(BIN)/pytest -q -m "(not pg or pg_core) and not slow"

test-all: venv chromium postgresql mosquitto
	$(BIN)/pytest -q

# The campaign suite on both backends and the multi-worker tests.
test-pg: venv postgresql
	$(BIN)/pytest -q tests/system/test_campaign.py tests/system/test_workers.py tests/host/test_db.py

demo: $(STAMP)
	$(BIN)/python tools/demo.py

# meterota side by side with smpmgr and mpremote cp on paced UART, pty and UDP links (README
# "Performance"); writes bench-results.json. BENCH_ARGS="--links udp-loopback --skip-heap" for a quick one.
bench: venv
	$(BIN)/python tools/bench.py $(BENCH_ARGS)

# Every flash operation of every upgrade step cut before and inside it, 256 KiB image.
powercut: $(STAMP)
	$(BIN)/python tools/powercut.py

fuzz: $(STAMP)
	$(BIN)/python tools/fuzz.py

# One campaign host process over 10 simulated concentrators x 100 meters (1010 MicroPython processes).
scale: $(STAMP)
	$(BIN)/python tools/scale.py 10 100

# Fan-out over a simulated 50 kbit/s shared medium with 5 % loss: 1, 10 and 100 meters, sequential
# unicast, parallel unicast and one multicast session side by side (long: the 100-meter unicast runs are
# bound by the medium, ~20 min each); then 100 meters on a Wi-Fi-like star.
fanout: $(STAMP)
	$(BIN)/python tools/fanout.py --meters 1,10,100 --medium shared:50k,loss=5%
	$(BIN)/python tools/fanout.py --meters 1,100 --modes parallel,multicast --medium star:1M,loss=1% --parallel 50

# Campaign workers over a PostgreSQL ledger: 10 concentrators x 100 meters + 50 direct devices with 1, 2
# and 4 workers (wall time, CPU and PostgreSQL transactions per device), then 2 with one killed at half.
scale-workers: $(STAMP) postgresql
	$(BIN)/python tools/scale.py --workers 1,2,4 10 100 50
	$(BIN)/python tools/scale.py --workers 2 --kill 10 100 50

# End-to-end tests against a real board: make hil PORT=/dev/ttyACM0 BOARD=rp2
hil: venv
	$(BIN)/pytest -q tests/system --port $(PORT) --board $(BOARD)

# The same suite in HIL mode against simulated boards (meterota sim --board: the board's own code,
# flash timing, watchdog, heap and CPU speed), one board per run: make hil-sim [SIM_SPEED=1.0]
SIM_SPEED ?= 1.0
hil-sim: venv chromium postgresql mosquitto
	$(BIN)/pytest -q tests/system --sim-board rp2 --sim-speed $(SIM_SPEED)
	$(BIN)/pytest -q tests/system --sim-board esp32 --sim-speed $(SIM_SPEED)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info host/*.egg-info .meterota
