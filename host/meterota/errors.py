"""Errors with the exit codes the CLI documents (README "Exit codes")."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1  # anything unexpected
EXIT_USAGE = 2  # bad command line
EXIT_UNREACHABLE = 3  # no such port, device silent, link lost
EXIT_REFUSED = 4  # the device or a pre-check refused the image or the request
EXIT_KO = 5  # the upgrade ran and the device reported KO (reverted)
EXIT_CONFIRMATION = 6  # the confirmation record did not verify
EXIT_PROTOCOL = 7  # the device answered something meaningless
EXIT_IMAGE = 8  # the image file is missing or not an MCUboot image
EXIT_STOPPED = 9  # a campaign ended before its end: aborted, halted at a group's threshold, or expired
EXIT_NOT_RECORDED = 10  # the device reached an outcome the records database could not take: spooled, import it
EXIT_BUSY = 11  # another process owns the campaign (its lease is live), or this one lost its lease
EXIT_RECORDS = 12  # the records database cannot be opened, read or written: a file that is not one, PostgreSQL
# unreachable (at start, or longer than 10 minutes mid-run), credentials refused, a schema newer than this meterota
EXIT_DATABASE = EXIT_RECORDS


class MeterotaError(Exception):
    exit_code = EXIT_FAILURE


class UsageError(MeterotaError):
    """A bad command line found after parsing: no device given, an unknown campaign."""

    exit_code = EXIT_USAGE


class StoreError(MeterotaError):
    """The records database (--db, $METEROTA_DB) cannot be opened or used."""

    exit_code = EXIT_RECORDS


class ImageError(MeterotaError):
    exit_code = EXIT_IMAGE


class TransportError(MeterotaError):
    exit_code = EXIT_UNREACHABLE


class DeviceTimeout(TransportError):
    pass


class SilentAfterReset(DeviceTimeout):
    """The device took the test image and went silent: a KO that only a field visit can explain."""


class ProtocolError(MeterotaError):
    exit_code = EXIT_PROTOCOL


class RefusedError(MeterotaError):
    exit_code = EXIT_REFUSED


class UpgradeKO(MeterotaError):
    exit_code = EXIT_KO


class ConfirmationError(MeterotaError):
    exit_code = EXIT_CONFIRMATION


class StaleRecord(ConfirmationError):
    """A genuine record that is not newer than the last one recorded for its device: a replay."""


class NotRecorded(MeterotaError):
    """The outcome could not be written to the records database; it was spooled."""

    exit_code = EXIT_NOT_RECORDED


class CampaignBusy(MeterotaError):
    """Another process holds the campaign's lease, or ours was taken over."""

    exit_code = EXIT_BUSY
