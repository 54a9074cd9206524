"""The one exception type users see: a single line that says what failed, why, and what to do."""


class QwenError(Exception):
    """A failure caused by the user's input or environment (not a bug); the CLI prints it as one line."""


class UnsupportedTensorType(QwenError):
    """A GGUF tensor uses a quantization this engine cannot dequantize."""
