# llava-twist: `make demo` runs the main job, `make test` runs every test. Both install what they need.
SHELL := /bin/bash
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LLAVA := llava-torch==1.2.2.post1
# lmms-eval's metadata asks for transformers>=4.39: installed like LLaVA, its runtime pinned by the `lmms` extra
LMMS_EVAL := lmms-eval==0.7.3
# DeepSpeed JIT-compiles its CPU communication op on first use; `install` builds it here, so no run compiles.
# Runs find the venv's tools first (as the launcher's children do): a build by another ninja is rebuilt.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Re-install when the install files change.
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | sha1sum | cut -c1-12)

.PHONY: install browser test base demo demo-clean playground lint clean

install: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	DS_BUILD_OPS=0 $(PIP) install -q -e ".[train,demo,serve,dev,lmms]"
	$(PIP) install -q --no-deps $(LLAVA) $(LMMS_EVAL)
	$(PY) -c "import llava_twist.model, scout_data, deepspeed, peft, lmms_eval.evaluator" >/dev/null
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null
	rm -f $(VENV)/.installed-* && touch $@
	@echo "installed into $(VENV)"

# Headless Chromium (Debian packages) for the playground's browser test; a no-op when present.
browser:
	bash scripts/install_browser.sh

# Two workers (CI has two cores), a file's tests on one of them, in the order tests/conftest.py gives (the ci demo's
# group first); `pytest tests` runs the same tests in one process.
TEST_WORKERS ?= 2
test: install browser
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=20 -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# The demo's base model, trained with the recipe in playground/miniature/recipe.py, measured, and released with its
# card to playground/models/tiny-llava-v1.5 (replacing the committed one); stages cached in playground/data/base-build.
base: install
	$(PY) -m playground.miniature.make_base --overwrite $(BASE_ARGS)

# The paper's claim in miniature on CPU; stages are cached in playground/data/demo (demo-clean resets).
demo: install
	$(PY) -m playground.miniature $(DEMO_ARGS)

demo-clean:
	rm -rf playground/data/demo

playground: install
	$(PY) -m playground $(PLAYGROUND_ARGS)

lint: install
	$(VENV)/bin/ruff check llava_twist scout_data scripts playground tests

clean:
	rm -rf $(VENV) playground/data/demo playground/data/tiny-llava
