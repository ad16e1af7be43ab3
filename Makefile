# Every target is safe to run again: the virtualenv is rebuilt only when
# requirements*.txt or pyproject.toml change.
#
# `make run` keeps the SIPCLUSTER_* / REDIS_URL overrides it is given (run/overrides.json)
# for later runs and sipctl; `make run RESET=1` drops them, `make run FORCE=1` allows a
# REDIS_URL that stops the managed Redis a running cluster uses.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
UP_FLAGS := $(if $(filter 1 yes true,$(RESET)),--reset) $(if $(filter 1 yes true,$(FORCE)),--force)

.PHONY: venv run stop test test-ha bench lint clean distclean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q -e . --no-deps
	touch $@

run: venv
	$(VENV)/bin/sipcluster up $(UP_FLAGS)

stop: venv
	$(VENV)/bin/sipcluster down

test: venv
	$(PYTHON) -m pytest -q tests/unit tests/integration

# The fault matrix: every kind of failure under SIPp load, about 40 s a fault.
test-ha: venv
	$(PYTHON) -m pytest -q tests/ha

bench: venv
	$(PYTHON) -m bench

lint: venv
	$(VENV)/bin/ruff check .

# clean keeps state/ (the managed Redis's data: users, registrations, live calls, CDRs);
# distclean deletes it too (the default redis.state_dir; one configured elsewhere is left alone).
clean:
	if [ -x $(VENV)/bin/sipcluster ]; then $(VENV)/bin/sipcluster down || true; fi
	rm -rf $(VENV) run
	@if [ -d state ]; then echo "kept state/ (users, registrations, CDRs): make distclean deletes it"; fi

distclean: clean
	rm -rf state
	@echo "deleted state/: every user, registration and CDR of the managed Redis"
