"""Test sequence model: its output is its carried state."""
