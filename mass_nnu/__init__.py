"""mass-nnu: MASS in-context segmentation pretraining for nnU-Net."""

__version__ = "0.1.0"
