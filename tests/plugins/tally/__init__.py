"""Test model for the frame cache: counts the frames it renders."""
