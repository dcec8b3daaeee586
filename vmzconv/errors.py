"""One error family: every failure a user can cause is a VmzconvError.

The CLI prints ``str(err)`` on one line and exits with ``err.exit_code``:
2 for bad input (the file, the options), 1 for a check that ran and failed.
"""


class VmzconvError(Exception):
    exit_code = 2


class InputError(VmzconvError):
    """The input file cannot be read as a VMZ Caffe2 checkpoint."""


class UnsafePickleError(InputError):
    """The pickle asks for something outside the allowlist (code, unknown types)."""


class ArchError(VmzconvError):
    """The blobs do not describe a supported architecture, or not the one named."""


class MappingError(VmzconvError):
    """A mapping table does not account for the blobs or the model exactly."""


class OutputError(VmzconvError):
    """The output cannot be written (exists, bad suffix, ...)."""


class CheckError(VmzconvError):
    """A check ran and failed (parity)."""

    exit_code = 1
