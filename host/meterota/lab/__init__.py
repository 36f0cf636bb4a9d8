"""The lab: what stands in for boards, links and fleets when there is no hardware.

Nothing in the product (upgrade, campaigns, deploy) imports from here; the CLI's
`sim` command and the tests do. `sim` runs the device code under the MicroPython
unix port, `faults` injects link faults, `fleet` starts concentrators and meters.
"""
