"""uqserve: segmentation with total, aleatoric and epistemic uncertainty, served."""

__version__ = "0.1.0"
