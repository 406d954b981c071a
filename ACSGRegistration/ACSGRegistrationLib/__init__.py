"""ACSGRegistration backend: deep-learning registration of lumbar vertebra CT, importable without Slicer."""

__version__ = "0.1.0"
