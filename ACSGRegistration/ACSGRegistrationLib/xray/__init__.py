"""CT to X-ray 2D/3D registration (ProST, Gao et al., IEEE TMI 2024): the C-arm's geometry and poses
(``camera``), X-ray images and their DICOM geometry (``images``), differentiable DRRs (``drr``), the
intensity-based pose search (``register``) and registration from files (``pipeline``). Nothing here imports
PyTorch (the command line's parser reads the methods from here)."""

# The pose searches: CMA-ES then gradient ascent through the renderer (default), either alone; ProST's learned
# similarity first, refined by both (needs a ProST model), or alone.
POSE_SEARCH_METHODS = ("cmaes+gradient", "cmaes", "gradient", "prost+cmaes+gradient", "prost")
