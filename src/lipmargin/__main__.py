"""``python -m lipmargin`` (also what ``torchrun -m lipmargin`` runs)."""

from lipmargin.cli import entry

if __name__ == "__main__":
    entry()
