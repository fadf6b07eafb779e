"""`python -m bardlm ...` (what `torchrun -m bardlm` runs)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
