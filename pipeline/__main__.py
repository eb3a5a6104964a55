"""``python -m pipeline``: the docembed command line."""

from pipeline.cli import console

if __name__ == "__main__":
    console()
