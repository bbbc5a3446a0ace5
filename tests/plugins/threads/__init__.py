"""Test model: reports the torch thread counts of the worker process it runs in."""
