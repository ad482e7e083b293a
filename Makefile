# A contributor's check before pushing: style, the import layers and the quick tests (about two
# minutes on a 2-core laptop). CI (.ci/run) runs everything, the real-model and notebook tests too.
.PHONY: check lint test-quick test

PYTHON ?= python

check: lint test-quick

lint:
	ruff check .
	lint-imports

# the tests that need neither SmolLM2 (marked slow) nor a notebook run, and none of the files
# whose tests each take several seconds of compression (they run in CI)
QUICK_SKIP = --ignore=tests/test_notebooks.py --ignore=tests/test_stream.py \
	--ignore=tests/test_stream_moe.py --ignore=tests/test_distributed.py \
	--ignore=tests/test_moe.py --ignore=tests/test_readers.py --ignore=tests/test_tradeoff.py \
	--ignore=tests/test_budget.py --ignore=tests/test_llmcompressor_fixtures.py

test-quick:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow" $(QUICK_SKIP) -p no:cacheprovider

test:
	$(PYTHON) -m pytest -q -ra -n 2 --dist loadfile --durations=15
