"""User-facing errors: the CLI prints each as one red line and exits 1, never a traceback."""


class ClearGenError(Exception):
    """Something the user can fix; the message says how."""


class ConfigError(ClearGenError):
    """Bad arguments: size, variant, window, backend."""


class CheckpointError(ClearGenError):
    """A CLEAR checkpoint that does not fit the model or the chosen variant."""


class WeightsError(ClearGenError):
    """Weights missing, gated, offline or corrupt."""


class DeviceError(ClearGenError):
    """The asked-for device is absent or out of memory."""


class OutputError(ClearGenError):
    """The output cannot be written."""


class ComputeError(ClearGenError):
    """A computation that went wrong (NaN or inf): the message says where, and nothing is saved."""


class ParallelError(ClearGenError):
    """One rank of a torchrun job failed on its own, or lost contact with the others: that rank prints it."""
