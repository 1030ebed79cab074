"""dapt: domain-adaptive pretraining of masked language models, run rigorously."""

__version__ = "0.1.0"
