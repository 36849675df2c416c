"""simclr-kit: SimCLR contrastive pretraining of image encoders, and what they are worth downstream."""

from __future__ import annotations

__version__ = "0.1.0"
