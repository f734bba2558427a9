"""The errors of saving and loading artifacts (re-exported by ``serialization``)."""

from __future__ import annotations


class ArtifactError(ValueError):
    """A corrupt, truncated, tampered or incompatible artifact."""


class ExportError(RuntimeError):
    """torch.export could not capture the model's architecture."""
