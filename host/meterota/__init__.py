"""meterota: firmware upgrades for MicroPython smart-meter boards over SMP (MCUmgr)."""

__version__ = "0.1.0"
