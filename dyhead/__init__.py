"""dyhead: a reproducible pipeline for Dynamic Head (Dai et al., CVPR 2021)."""

__version__ = "0.1.0"
