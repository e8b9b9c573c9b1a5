"""The model pipeline."""
