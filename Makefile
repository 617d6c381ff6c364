# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   install, build the reference models, backdoor, purify, classify, report
#   make test   install and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
# Everything runs offline: pretrained tags fail at once instead of waiting on a hub.
export HF_HUB_OFFLINE := 1

.PHONY: demo test install data

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e ".[training,onnxruntime,test,serve]"
	-$(PY) -m cpp_ext build  # the fused C++ operator (about 30 s); optional: serving falls back without it
	touch $@

# Debian's Fashion-MNIST: the reference benchmark's data.
data:
	@test -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: install data
	$(PY) -m training

test: install data
	CLIP_GUARD_REQUIRE_DATA=1 CLIP_GUARD_REQUIRE_EXT=1 $(PY) -m pytest
