"""Parley Python SDK."""

from .client import ClientStats, Nacked, ParleyClient, ParleyClientError, RequestFailed, Violation

__all__ = ["ClientStats", "Nacked", "ParleyClient", "ParleyClientError", "RequestFailed", "Violation"]
