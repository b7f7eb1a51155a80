"""Plotting shared by the CLI, ``paper_figures/`` and the notebooks: the style (:mod:`.style`), the gate figure
(:mod:`.gates`, ``sspo gates``) and training curves (:mod:`.runs`, ``sspo plot``)."""
