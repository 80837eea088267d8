"""Recipes: one per training verb, each a small composition of data, model, objective and the
training loop (:mod:`kvlab.training`), callable from Python as from the CLI."""
