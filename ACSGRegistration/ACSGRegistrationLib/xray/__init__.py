"""CT to X-ray 2D/3D registration (ProST, Gao et al., IEEE TMI 2024): the C-arm's geometry and poses
(``camera``), differentiable DRRs (``drr``)."""
