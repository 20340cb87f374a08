"""chatterbox-fast: a fast, weight-compatible inference engine for Resemble AI's Chatterbox TTS."""

from .conditioning import Conditionals
from .engine import OptimizedChatterboxTTS
from .optim import enable_flash_attention_for_llama

__version__ = "0.1.0"
__all__ = ["Conditionals", "OptimizedChatterboxTTS", "enable_flash_attention_for_llama", "__version__"]
