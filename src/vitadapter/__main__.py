"""``python -m vitadapter``: the same command as the ``vitadapter`` script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
