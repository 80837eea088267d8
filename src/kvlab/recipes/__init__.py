"""Recipes: one per verb that does work (pretraining, fine-tuning, generation, ``kvlab shrink``),
each a config dataclass holding its defaults and a function that composes data, model, objective
and the training loop (:mod:`kvlab.training`) — callable from Python as from the CLI."""
