# meterota — every target installs what it needs into .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STUBS  := $(VENV)/mpstubs/.done

.PHONY: all venv chromium test demo bench powercut fuzz scale fanout hil clean

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

test: venv chromium
	$(BIN)/pytest -q

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

# End-to-end tests against a real board: make hil PORT=/dev/ttyACM0 BOARD=rp2
hil: venv
	$(BIN)/pytest -q tests/system --port $(PORT) --board $(BOARD)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info host/*.egg-info .meterota
