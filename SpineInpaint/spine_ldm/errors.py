"""Typed errors. Each carries a one-line message and a process exit code.

The CLI maps them to exit codes and to a final JSON line
``{"event": "error", "kind": ..., "message": ...}``; nothing else prints tracebacks
(unless ``--debug``).
"""


class SpineLDMError(Exception):
    """Base class: one-line, user-facing message."""

    exit_code = 1
    kind = "error"


class InputError(SpineLDMError):
    """Bad input file, bad landmark, bad level/condition, bad parameters."""

    exit_code = 2
    kind = "input"


class ModelError(SpineLDMError):
    """Missing / corrupt / incompatible weights or registry entries."""

    exit_code = 3
    kind = "model"


class DeviceError(SpineLDMError):
    """Requested device unavailable, or out of memory even at batch size 1."""

    exit_code = 4
    kind = "device"


class CancelledError(SpineLDMError):
    """The run was cancelled by the user (nothing was written)."""

    exit_code = 130
    kind = "cancelled"
