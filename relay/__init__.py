"""relay: a WebSocket edge relay for feature-flag delivery."""

__version__ = "0.1.0"
