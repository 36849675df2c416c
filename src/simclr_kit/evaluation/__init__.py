"""Downstream evaluation protocols on frozen features: kNN, linear probe, label efficiency."""
