"""Errors a user can act on. The CLIs print them without a traceback and exit non-zero."""


class PkdError(Exception):
    """An error caused by an input the user controls; the message names the input and what to do."""

    exit_code = 2


class StoreError(PkdError):
    """A pair store is missing, foreign, of another version, incomplete, locked or inconsistent."""


class DataError(PkdError):
    """Input data (a .sens file, an exported scene folder, a dataset) is missing or malformed."""


class ConfigError(PkdError):
    """Arguments or a configuration are invalid or conflict with what already exists."""


class WeightsError(PkdError):
    """Model weights are missing, of another architecture or unreadable."""


class OutputError(PkdError):
    """An output cannot be written (read-only folder, full disk, file-size limit): a fault, exit code 1."""

    exit_code = 1


class TrainingError(PkdError):
    """Training cannot go on (NaN loss, corrupt checkpoint, store lacking arrays a variant needs)."""
