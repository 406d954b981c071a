"""CT to X-ray 2D/3D registration (ProST, Gao et al., IEEE TMI 2024): the C-arm's geometry and poses
(``camera``), X-ray images and their DICOM geometry (``images``), differentiable DRRs (``drr``), the
intensity-based pose search (``register``), registration from files (``pipeline``) with its figure (``overlay``),
and a worked example to try it on, simulated from a CT (``example``). Nothing here imports
PyTorch (the command line's parser reads the methods from here)."""

# The pose searches: CMA-ES then gradient ascent through the renderer (default), either alone; ProST's learned
# similarity first, refined by both (needs a ProST model), or alone.
POSE_SEARCH_METHODS = ("cmaes+gradient", "cmaes", "gradient", "prost+cmaes+gradient", "prost")

# What ``xray-register`` writes for each X-ray, by kind: the first view's files as named here, the N-th's with
# ``_N`` before the extension (``pose_2.json``, ...); ``metrics.json`` once for all views.
VIEW_OUTPUTS = (("pose", ".json"), ("drr", ".nii.gz"), ("xray", ".nii.gz"), ("projections", ".json"),
                ("overlay", ".png"))


def view_outputs(view: int = 1) -> dict:
    """{kind: file name} of the ``view``-th X-ray's outputs (1: ``pose.json``, ...; 2: ``pose_2.json``, ...)."""
    return {kind: kind + view_suffix(view) + extension for kind, extension in VIEW_OUTPUTS}


def view_suffix(view: int) -> str:
    """What the ``view``-th X-ray's file names add before their extension: nothing for the first, ``_2``, ..."""
    return "" if view == 1 else f"_{view}"
