"""mlfarm: a render farm for machine-learning inference on VFX shots."""

__version__ = "0.1.0"
