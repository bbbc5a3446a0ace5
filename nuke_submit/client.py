"""Deprecated: the submission client is ``mlfarm.client``; this name goes in the next release.

Kept so Nuke scripts in the wild that ``from mlfarm.nuke_submit.client import Farm`` go on
working for one release, with a warning saying where the client lives now.
Python 3.7 grammar: Nuke's Python imports this.
"""

import warnings

from mlfarm.client import Farm, SubmitError  # noqa: F401

warnings.warn("mlfarm.nuke_submit.client is deprecated; import Farm and SubmitError from mlfarm.client",
              DeprecationWarning, stacklevel=2)
