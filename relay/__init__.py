"""relay: a WebSocket edge relay for feature-flag delivery."""

__version__ = "0.2.0"
