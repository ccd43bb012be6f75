"""``python -m kimiha`` entry point (also the ``kimiha`` console script)."""

from kimiha.apps.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
