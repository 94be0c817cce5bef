"""Warning and error categories of the package (imported by every layer, so it imports nothing)."""

from __future__ import annotations

__all__ = ["TranscriptFormerWarning"]


class TranscriptFormerWarning(UserWarning):
    """Something about the input that the user should look at (results are still computed)."""
