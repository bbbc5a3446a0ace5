"""Model plugins: the ``BaseModel`` authoring surface, options, and discovery.

Importing this package must stay cheap (no torch): the catalog, the CLI and Nuke use it.
"""

from .base import BaseModel, InputError
from .options import Choice, OptionError

__all__ = ["BaseModel", "Choice", "InputError", "OptionError"]
