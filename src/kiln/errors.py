"""The exception types users see: a clear, one-paragraph message, never a traceback."""


class KilnError(Exception):
    """An error caused by the user's input (config, data, files, arguments).

    The CLI prints ``str(error)`` and exits with status 2; the Python API lets it propagate.
    """


class ConfigError(KilnError):
    """A config value is missing, misspelt, of the wrong type, or describes an impossible model."""


class DataError(KilnError):
    """A data file is missing, corrupt, truncated or fails its checksum."""


class RunDirError(KilnError):
    """A directory is not a kiln run, or a run directory would be overwritten."""


class InputError(KilnError):
    """One input sent for prediction is wrong; ``where`` names it, e.g. ``instances.3.pixels`` (a server
    answers it with a 4xx)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
