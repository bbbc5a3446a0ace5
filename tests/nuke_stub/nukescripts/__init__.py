"""Stand-in for Nuke's ``nukescripts`` package: just the documented panel API mlfarm uses."""

from .panels import PythonPanel, registerWidgetAsPanel  # noqa: F401
