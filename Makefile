# The README's first two commands: `make train` and `make test`. Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
TEST   := $(VENV)/.installed-test

.PHONY: install train test browser bench clean

install: $(CORE)

# `make train`: danlu and what the default recipe needs, nothing more (the extras are `pip install 'danlu[...]'`)
$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $(CORE)

# `make test`: the test extra too, and facenet-pytorch without its dependencies: it pins torch<=2.3, and the tests
# only build its network to check danlu's key map against (tests/models/test_facenet.py)
$(TEST): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps 'facenet-pytorch==2.6.0'
	touch $(TEST) $(CORE)

train: install
	$(BIN)/danlu train $(ARGS)

test: $(TEST) browser
	$(BIN)/python -m pytest

# the page's browser test (tests/serve) drives Debian's chromium: installed here where missing and possible (root and
# apt-get); where not, that one test is skipped with the reason. Never fails `make test`.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  echo "installing chromium for the browser test (apt-get)" && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium is not installed: the browser test will be skipped"

bench: install
	$(BIN)/python benchmarks/loop_overhead.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info .pytest_cache
