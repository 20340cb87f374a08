"""chatterbox-fast: a fast, weight-compatible inference engine for Resemble AI's Chatterbox TTS."""

__version__ = "0.1.0"
