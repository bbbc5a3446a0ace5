"""Test window model: the mean of each frame and its neighbours."""
