"""ce-ray: fine-tune, tune and serve sentence-transformers CrossEncoders on Ray."""

__version__ = "0.1.0"
