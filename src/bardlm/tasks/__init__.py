"""Toy tasks that check a model's machinery end to end (the reversal probe, seq2seq toys)."""
