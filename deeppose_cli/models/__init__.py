"""Cascades shipped inside the package, one run directory each (``lspet-small``: see
docs/model-card.md). ``deeppose predict --model NAME`` runs one; predict and evaluate use
``lspet-small`` when no run of the user's own exists."""
