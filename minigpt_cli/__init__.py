"""minigpt: train and sample a small character-level GPT from the command line."""

__version__ = "0.1.0"
