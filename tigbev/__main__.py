"""``python -m tigbev``: the command line without the console script (a tree on PYTHONPATH, not installed)."""

from tigbev.cli import app

if __name__ == "__main__":  # spawned workers import this module as __mp_main__ and must not rerun the command
    app(prog_name="tigbev")
