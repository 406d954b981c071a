"""2D deformable registration (Shan et al. 2017): an unsupervised fully convolutional network with an
edge-aware smoothness loss, for radiographs, DRRs and single CT slices, in physical space."""
