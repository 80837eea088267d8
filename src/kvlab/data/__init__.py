"""Data: the built-in corpus, tokenized files and step-determined windows, chat/SFT rows, and
the built-in instruction tasks."""
