"""``python -m docembed``: the docembed command line."""

from docembed.cli import console

if __name__ == "__main__":
    console()
