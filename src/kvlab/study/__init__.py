"""``kvlab study``: the GQA and CLA papers' trade-offs reproduced in one command (protocol,
result rows, report)."""
