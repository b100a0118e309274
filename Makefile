# Everything runs from a project-local virtualenv (.venv) that `make install` builds.
# t5x, airio and jestimator have no usable PyPI release: they come from T5X_WHEELS (wheels built
# from the pinned commits, checked against requirements/t5x-wheels.sha256) when that directory
# exists, otherwise from the pinned git commits in requirements/t5x-pins.txt. Both with --no-deps.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
T5X_WHEELS ?= $(wildcard ../shared/wheels)
STAMP := $(VENV)/.flip-installed
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
DEMO_DATA ?= data/demo
DEMO_WORKDIR ?= workdirs/demo
DEMO_M3AE_DATA ?= data/demo-m3ae
PYTEST_ARGS ?=

.PHONY: install test test-slow demo demo-mae demo-m3ae bench clean distclean fashion-mnist

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml requirements/t5x-pins.txt requirements/t5x-wheels.sha256
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	@if [ -n "$(T5X_WHEELS)" ]; then \
	  echo "installing t5x, airio, jestimator from $(T5X_WHEELS)"; \
	  (cd "$(T5X_WHEELS)" && sha256sum --quiet -c "$(CURDIR)/requirements/t5x-wheels.sha256") && \
	  $(PY) -m pip install -q --no-deps $(addprefix $(T5X_WHEELS)/,t5x-0.0.0-py3-none-any.whl airio-0.0.1-py3-none-any.whl jestimator-0.3.3-py3-none-any.whl); \
	else \
	  echo "installing t5x, airio, jestimator from their pinned git commits"; \
	  $(PY) -m pip install -q --no-deps -r requirements/t5x-pins.txt; \
	fi
	$(PY) -c "import t5x.partitioning, t5x.train_state, t5x.optimizers, flip; print('install ok')"
	touch $@

# Exit code 5 (no tests collected) is an error, never a pass. The end-to-end tests need
# Fashion-MNIST: it is installed first, and a test that finds it missing fails (not skips) unless
# FLIP_ALLOW_MISSING_DATA=1 is set.
test: install fashion-mnist
	FASHION_MNIST=$(FASHION_MNIST) $(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

test-slow: install fashion-mnist
	FASHION_MNIST=$(FASHION_MNIST) FLIP_SLOW_TESTS=1 $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or set FASHION_MNIST=<dir with the idx .gz files>" >&2; exit 1; \
	  fi; \
	fi

# The demo runs FLIP's three command lines on the demo config: masked pretraining (zero-shot at the
# end), unmasked tuning from that checkpoint, and eval_only on the tuned model.
DEMO_TUNE_ARGS ?= --config.model.model_img.mask_ratio=0.0 --config.learning_rate=1e-4 \
	--config.num_epochs=0.25 --config.warmup_epochs=0.05
demo: install fashion-mnist
	$(PY) -m flip.data.demo --fashion_mnist_dir=$(FASHION_MNIST) --out_dir=$(DEMO_DATA)
	rm -rf $(DEMO_WORKDIR)
	@echo "== masked pretraining (mask ratio 0.5), zero-shot at the end"
	$(PY) main.py --workdir=$(DEMO_WORKDIR)/pretrain --config=configs/cfg_demo.py
	@echo "== unmasked tuning from the pretrained checkpoint"
	$(PY) main.py --workdir=$(DEMO_WORKDIR)/tune --config=configs/cfg_demo.py \
	  --config.pretrain_dir=$(DEMO_WORKDIR)/pretrain $(DEMO_TUNE_ARGS)
	@echo "== zero-shot evaluation of the tuned model (eval_only)"
	$(PY) main.py --workdir=$(DEMO_WORKDIR)/eval --config=configs/cfg_demo.py \
	  --config.pretrain_dir=$(DEMO_WORKDIR)/tune --config.eval_only=True

# The MAE demo (docs/MAE.md): MAE pretraining on the demo images, a reconstruction grid, a linear
# probe of the frozen encoder and a short fine-tuning, each from the pretrained checkpoint, in
# $(DEMO_WORKDIR)-mae. Every stage's output is kept in <stage>.log; the accuracies are printed last.
demo-mae: install fashion-mnist
	$(PY) -m flip.data.demo --fashion_mnist_dir=$(FASHION_MNIST) --out_dir=$(DEMO_DATA)
	rm -rf $(DEMO_WORKDIR)-mae && mkdir -p $(DEMO_WORKDIR)-mae && date +%s > $(DEMO_WORKDIR)-mae/start_time
	@echo "== MAE pretraining (mask ratio 0.75, norm_pix_loss)"
	set -o pipefail; $(PY) main.py --workdir=$(DEMO_WORKDIR)-mae/mae --config=configs/cfg_mae_demo.py \
	  2>&1 | tee $(DEMO_WORKDIR)-mae/mae.log
	@echo "== reconstruction grid (original | masked | reconstruction | reconstruction + visible)"
	set -o pipefail; $(PY) -m flip.visualize --workdir=$(DEMO_WORKDIR)-mae/mae \
	  --config=configs/cfg_mae_demo.py --out=$(DEMO_WORKDIR)-mae/reconstructions.png \
	  2>&1 | tee $(DEMO_WORKDIR)-mae/visualize.log
	@echo "== linear probe of the frozen encoder"
	set -o pipefail; $(PY) main.py --workdir=$(DEMO_WORKDIR)-mae/linprobe \
	  --config=configs/cfg_linprobe_demo.py --config.pretrain_dir=$(DEMO_WORKDIR)-mae/mae \
	  2>&1 | tee $(DEMO_WORKDIR)-mae/linprobe.log
	@echo "== fine-tuning"
	set -o pipefail; $(PY) main.py --workdir=$(DEMO_WORKDIR)-mae/finetune \
	  --config=configs/cfg_finetune_demo.py --config.pretrain_dir=$(DEMO_WORKDIR)-mae/mae \
	  2>&1 | tee $(DEMO_WORKDIR)-mae/finetune.log
	@echo "== MAE demo results ($$(( $$(date +%s) - $$(cat $(DEMO_WORKDIR)-mae/start_time) )) s)"
	@grep -h "mae/heldout_loss" $(DEMO_WORKDIR)-mae/visualize.log
	@echo "linear probe: $$(grep -h 'eval at step' $(DEMO_WORKDIR)-mae/linprobe.log | tail -1)"
	@echo "fine-tuning:  $$(grep -h 'eval at step' $(DEMO_WORKDIR)-mae/finetune.log | tail -1)"

# The M3AE demo (docs/M3AE.md): the demo set written as HDF5 (paired images + captions, a
# text-only file, held-out captions, the images with labels in M3AE's ImageNet layout and the
# demo's WordPiece vocabulary), M3AE pretraining on both sources, a linear probe of its frozen
# encoder, and for comparison the same probe of the MAE demo's encoder (pretrained here too) and of
# a random encoder, every probe on the ImageNet-layout file (hdf5:), in $(DEMO_WORKDIR)-m3ae.
# Every stage's output is kept in <stage>.log.
M3AE_WD = $(DEMO_WORKDIR)-m3ae
M3AE_PROBE_DATA = --config.data.train=hdf5:$(DEMO_M3AE_DATA)/imagenet.h5 \
  --config.evals.classification.dataset=hdf5:$(DEMO_M3AE_DATA)/imagenet.h5
demo-m3ae: install fashion-mnist
	rm -rf $(M3AE_WD) && mkdir -p $(M3AE_WD) && date +%s > $(M3AE_WD)/start_time
	$(PY) -m flip.data.demo --fashion_mnist_dir=$(FASHION_MNIST) --out_dir=$(DEMO_DATA)
	$(PY) -m flip.data.demo_hdf5 --fashion_mnist_dir=$(FASHION_MNIST) --out_dir=$(DEMO_M3AE_DATA)
	@echo "== M3AE pretraining (image and text masks 0.75; paired + text-only HDF5)"
	set -o pipefail; $(PY) main.py --workdir=$(M3AE_WD)/m3ae --config=configs/cfg_m3ae_demo.py \
	  --config.data.train=$(DEMO_M3AE_DATA)/paired.h5 \
	  --config.data.text_only=$(DEMO_M3AE_DATA)/text.h5 2>&1 | tee $(M3AE_WD)/m3ae.log
	@echo "== linear probe of the frozen M3AE encoder"
	set -o pipefail; $(PY) main.py --workdir=$(M3AE_WD)/linprobe-m3ae \
	  --config=configs/cfg_linprobe_demo.py --config.pretrain_dir=$(M3AE_WD)/m3ae \
	  $(M3AE_PROBE_DATA) 2>&1 | tee $(M3AE_WD)/linprobe-m3ae.log
	@echo "== MAE pretraining (the MAE demo's) and the same probe"
	set -o pipefail; $(PY) main.py --workdir=$(M3AE_WD)/mae --config=configs/cfg_mae_demo.py \
	  2>&1 | tee $(M3AE_WD)/mae.log
	set -o pipefail; $(PY) main.py --workdir=$(M3AE_WD)/linprobe-mae \
	  --config=configs/cfg_linprobe_demo.py --config.pretrain_dir=$(M3AE_WD)/mae \
	  $(M3AE_PROBE_DATA) 2>&1 | tee $(M3AE_WD)/linprobe-mae.log
	@echo "== the same probe of a random encoder"
	set -o pipefail; $(PY) main.py --workdir=$(M3AE_WD)/linprobe-random \
	  --config=configs/cfg_linprobe_demo.py $(M3AE_PROBE_DATA) 2>&1 | tee $(M3AE_WD)/linprobe-random.log
	@echo "== M3AE demo results ($$(( $$(date +%s) - $$(cat $(M3AE_WD)/start_time) )) s)"
	@echo "M3AE pretraining: $$(grep -h '^step ' $(M3AE_WD)/m3ae.log | tail -1)"
	@echo "M3AE reconstructions: $$(grep -h 'eval at step' $(M3AE_WD)/m3ae.log | tail -2 | tr '\n' ' ')"
	@echo "linear probe, M3AE encoder:  $$(grep -h 'eval at step' $(M3AE_WD)/linprobe-m3ae.log | tail -1)"
	@echo "linear probe, MAE encoder:   $$(grep -h 'eval at step' $(M3AE_WD)/linprobe-mae.log | tail -1)"
	@echo "linear probe, random encoder: $$(grep -h 'eval at step' $(M3AE_WD)/linprobe-random.log | tail -1)"

bench: install
	$(PY) bench/run_all.py

clean:
	rm -rf build dist *.egg-info .pytest_cache $(DEMO_WORKDIR)

distclean: clean
	rm -rf $(VENV) data workdirs
