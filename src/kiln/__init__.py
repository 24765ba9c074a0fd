"""kiln: describe a model and its data in one YAML file; train, evaluate and predict with it."""

__version__ = "0.1.0"

from kiln.config import Config, load_config  # noqa: E402
from kiln.errors import ConfigError, DataError, KilnError, RunDirError  # noqa: E402
from kiln.run import Run  # noqa: E402
from kiln.train.loop import train  # noqa: E402

__all__ = ["Config", "ConfigError", "DataError", "KilnError", "Run", "RunDirError", "load_config", "train"]
