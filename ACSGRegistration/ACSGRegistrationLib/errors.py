"""The errors a user of the backend can act on, in one hierarchy importable without PyTorch.

Every front door (the command line, the Slicer module, scripts) catches ``ACSGError`` to show its message
alone; anything else is a bug and keeps its traceback.
"""


class ACSGError(Exception):
    """Base of the errors whose message tells the user what to change."""


class InputError(ACSGError, ValueError):
    """An input the registration cannot use; the message names the input (file, node, level, parameter)."""


class PreprocessingError(InputError):
    """A vertebra cannot be cropped from its scan and label map (missing label, vanishing at the grid)."""


class CheckpointError(ACSGError, RuntimeError):
    """A model file that cannot be loaded, or a training run that cannot resume from its folder."""


class ResultError(ACSGError, RuntimeError):
    """A computation gave an unusable result (NaN or infinite values): nothing of it is written or shown."""


class OutputError(ACSGError, OSError):
    """Outputs that could not be written completely (disk full, permissions): their folder was left as it was."""


class DependencyError(ACSGError, ImportError):
    """A package the backend or the module needs is missing; the message says how to get it."""


class Cancelled(ACSGError, RuntimeError):
    """Long work (refinement, a batch, a known-deformation evaluation) stopped at the user's request."""
