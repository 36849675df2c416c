"""Metrics logs, plots and the run report."""
