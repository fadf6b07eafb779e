"""Teaching code, apart from the library: the reversal probe and the experiments behind
docs/concepts.md. Built only from the library's public pieces (the model, data, one training loop)."""
