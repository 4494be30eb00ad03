"""Training methods (standard, PGD-AT, TRADES, MoE-AT, AdvMoE), evaluation and reports: see issue 4."""
