# make run        set up .venv if needed, then embed the bundled sample into ./out/
# make test       set up .venv if needed, then run the test suite: every test (what CI runs)
# make test-fast  the same, but only the tests marked `unit` (pytest -m unit): the edit-test loop
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-fast clean

$(STAMP): requirements.txt setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/docembed run --job jobs/local.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m unit tests

clean:
	rm -rf out
