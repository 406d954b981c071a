"""2D deformable registration (Shan et al. 2017): an unsupervised fully convolutional network with an
edge-aware smoothness loss, for radiographs, DRRs and single CT slices, in physical space."""

# Steps per grid of the 2D test-time refinement (``refinement.PlanarRefineConfig``), here so that the command
# line's help reads it without importing PyTorch.
REFINE_STEPS = 50

# The kinds of view of a CT (``data.spine_view``), here for the command line's choices too.
SLICES = ("sagittal", "coronal", "axial")
PROJECTIONS = ("lateral", "ap")
