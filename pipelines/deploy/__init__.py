"""The deploy pipeline."""
