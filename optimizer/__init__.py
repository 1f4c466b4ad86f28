"""kiln: take a trained model to a fast, verified inference engine for a given GPU."""

__version__ = "0.1.0"
