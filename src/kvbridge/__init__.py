"""kvbridge: move paged KV cache blocks between GPU, pinned CPU memory and other engines."""

from kvbridge.config import ConfigError, TransferConfig

__version__ = "0.1.0"
__all__ = ["ConfigError", "TransferConfig", "__version__"]
