# The image group's error table: Refused reasons as IMG_MGMT_ERR codes, and
# Zephyr's translation of those codes for SMP v1 clients. Only an error needs
# them, so they are loaded then (grp_image._v1, imgcheck.refused, imgstate).
import smp
from smp import GroupError
from grp_image import (UNKNOWN, NO_IMAGE, NO_TLVS, NO_FREE_SLOT, INVALID_SLOT, INVALID_LENGTH,
                       INVALID_IMAGE_HEADER, INVALID_HASH, CURRENT_VERSION_IS_NEWER,
                       IMAGE_ALREADY_PENDING, INVALID_IMAGE_VECTOR_TABLE, IMAGE_CONFIRMATION_DENIED,
                       IMAGE_SETTING_TEST_TO_ACTIVE_DENIED, NO_FREE_MEMORY)

_REFUSED = {
    "test-active": IMAGE_SETTING_TEST_TO_ACTIVE_DENIED,
    "pending": IMAGE_ALREADY_PENDING,
    "not-bootable": INVALID_IMAGE_HEADER,
    "in-use": NO_FREE_SLOT,
    "downgrade": CURRENT_VERSION_IS_NEWER,
    "unsigned": IMAGE_CONFIRMATION_DENIED,
    "wrong-key": IMAGE_CONFIRMATION_DENIED,
    "bad-signature": IMAGE_CONFIRMATION_DENIED,
    "wrong-kind": INVALID_IMAGE_VECTOR_TABLE,
}

# Zephyr's img_mgmt_translate_error_code for SMP v1 clients, case by case: the
# invalid-argument codes are INVALID_SLOT (14) and 19-22, 24, 25; the header
# magic (23), version query (26) and vector table/size/overrun (29-31) are
# EUNKNOWN there, as is every code it does not list. Checked against
# tests/device/vectors/smp_v1_errors.json.
_V1_EINVAL = (INVALID_SLOT, 19, 20, INVALID_LENGTH, INVALID_IMAGE_HEADER, INVALID_HASH, 25)


def v1_rc(rc):
    """Zephyr's translation of image errors for SMP v1 clients."""
    if rc in (NO_IMAGE, NO_TLVS):
        return smp.ENOENT
    if rc in (NO_FREE_SLOT, CURRENT_VERSION_IS_NEWER, IMAGE_ALREADY_PENDING):
        return smp.EBADSTATE
    if rc == NO_FREE_MEMORY:
        return smp.ENOMEM
    if rc in _V1_EINVAL:
        return smp.EINVAL
    return smp.EUNKNOWN


def refused(r):
    """The image group's error for a Refused operation."""
    return GroupError(_REFUSED.get(r.why, UNKNOWN))
