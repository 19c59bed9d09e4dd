# The two commands a newcomer needs: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch version this project is tested with; pyproject admits others. Pinning here keeps pip from
# resolving a newer torch (and gigabytes of CUDA wheels) on a CPU machine.
TORCH_PIN := torch==2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?=
# The offline JPEG-q75 copy of CIFAR-10 that sits beside this repo on the team's machines (no internet there).
Q75 := ../shared/datasets/cifar10-q75
Q75_DATA := $(HOME)/.cache/cifarbench/cifar10-q75

.PHONY: demo test test-fast venv clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# The main job: the notebook's two models as it trained them, and the exercise answered (speedrun, fast
# recipe; on a CPU a 120 s budget). With $$CIFARBENCH_DATA (or ./data) it uses that copy, verified;
# failing that, the offline q75 copy when it is beside the repo (not the official files, so --no-verify);
# failing that, it downloads the official archive.
demo: venv
	@if [ -z "$$CIFARBENCH_DATA" ] && [ ! -d data ] && [ -f $(Q75)/materialize.py ]; then \
		$(PY) $(Q75)/materialize.py $(Q75_DATA) >/dev/null && \
		echo "demo: using the offline JPEG-q75 copy in $(Q75_DATA) (not the official files: --no-verify)" && \
		CIFARBENCH_DATA=$(Q75_DATA) $(VENV)/bin/cifarbench compare fnn cnn speedrun --no-verify $(DEMO_ARGS); \
	else \
		$(VENV)/bin/cifarbench compare fnn cnn speedrun $(DEMO_ARGS); \
	fi
	@echo "demo: done. For the cifarbench command in your shell: . .venv/bin/activate"

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The quick local tier: `make test-fast` runs pytest -q -m "not slow and not realdata and not distributed".
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not realdata and not distributed" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
