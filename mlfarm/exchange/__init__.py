"""The request exchange between the MLClient gateway and the workers that answer it.

Both sides import it and neither imports the other: the gateway (``mlfarm.gateway``) publishes a
request and waits, a worker (``worker/interactive.py``) claims it, runs the model and replies.

- ``relay.py``: requests and replies through Redis (pixels kept out of the AOF), or their headers
  only when the pixels go through shared storage.
- ``spool.py``: the pixels as files on shared storage (``MLFARM_GATEWAY_TRANSPORT=storage``).
- ``images.py``: ``WireImage``, one float32 image as it crosses.
- ``inference.py``: ``run_model``, one frame through a warm model, the same on both sides.
"""
