"""Plotting helpers shared by the CLI, ``paper_figures/`` and the notebooks."""
