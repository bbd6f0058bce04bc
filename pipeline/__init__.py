"""itr-pipeline: distributed data-and-training pipeline for image-text retrieval."""

__version__ = "0.1.0"
