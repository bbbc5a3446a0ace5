"""Frames in and out: reading any image OpenImageIO knows, writing EXRs on the CPU or the GPU.

Core: the worker, training and model plugins use it, and it imports nothing above ``mlfarm.storage``.

- ``io.py``: ``read_image``, ``write_planes`` (numpy arrays or tensors on any device), ``write_exr``,
  ``write_json`` (sidecars), ``configure_openexr``.
- ``gpu.py``: ZIPS EXRs compressed on the GPU that made the planes (nvCOMP).
- ``common.py``: what both writers share (``FrameError``, header values, failure messages).
"""
