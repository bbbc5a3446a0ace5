"""SAM 2.1 video segmentation: objects marked once, followed through the shot (Hugging Face transformers)."""
