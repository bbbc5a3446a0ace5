"""Depth Anything V2 (Hugging Face transformers): a depth.Z plane per frame, in Nuke's conventions."""
