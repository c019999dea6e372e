# sparse_dm — common tasks. PYTHON defaults to the project venv created by `make install`.
PYTHON ?= .venv/bin/python

.PHONY: bench-masking install test lint train cost bench bench-bands bench-train-kernels bench-train bench-train-e2e sketch-features sketch-metric sweep-demo study results report clean

install:  ## create .venv and install sparse_dm with dev extras
	python3 -m venv .venv
	.venv/bin/pip install -e '.[dev]'

test:  ## the whole suite (CPU, no network)
	WANDB_MODE=disabled $(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .

train:  ## the default CPU run on the bundled KanjiVG (a few minutes)
	$(PYTHON) -m sparse_dm.train

cost:
	$(PYTHON) -m sparse_dm.cost

sweep-demo:  ## the CPU demo grid (static/rigl/magran x S x seeds, plus dense) and its report
	WANDB_MODE=disabled $(PYTHON) -m sparse_dm.train -m --config-dir multirun_sweeps --config-name demo_cpu_kanjivg \
		hydra/launcher=local_parallel hydra.launcher.n_jobs=2 num_threads=1
	WANDB_MODE=disabled $(PYTHON) -m sparse_dm.train -m --config-dir multirun_sweeps --config-name demo_cpu_kanjivg \
		hydra/launcher=local_parallel hydra.launcher.n_jobs=2 num_threads=1 method=dense sparsity=0
	$(MAKE) report SWEEP=multirun/demo_cpu_kanjivg

# backend=sparse: the committed study records trained every arm it can train compactly that way (a 1,500-step
# S = 0.5 run: ~5 min against ~15 min dense on a 2-core Intel Xeon); band and dense arms train dense
STUDY = WANDB_MODE=disabled $(PYTHON) -m sparse_dm.study n_jobs=2 num_threads=1 backend=sparse
SPECS = multirun_sweeps/study_specs

study:  ## issue 23: every declared study (hours on 2 cores; resumable, finished runs are skipped), then results
	$(STUDY) 'specs=[$(SPECS)/dst_schedule_s50.yaml,$(SPECS)/bands_fair.yaml]'
	$(MAKE) results
	$(STUDY) 'specs=[$(SPECS)/dst_schedule_s90.yaml]'  # refused until inputs.te_best is set from stage 1
	$(MAKE) results

results:  ## every study's contrasts.md and docs/results.md from the committed records (seconds)
	$(PYTHON) -m sparse_dm.report --config-name study_results

bench:  ## sparse vs dense: training step, mask update, DDIM sampling, file size (a few minutes)
	$(PYTHON) -m benchmarks.suite

bench-masking:  ## per-step mask work and EMA update: per-tensor vs multi-tensor ops (docs/benchmarks_masking.md)
	$(PYTHON) -m benchmarks.masking

bench-bands:  ## timestep-band masks vs one mask: training step and DDIM wall time (about a minute)
	$(PYTHON) -m benchmarks.timestep_bands

bench-train-kernels:  ## sparse training kernels vs masked dense PyTorch, fwd+bwd at ChiroDiff's shapes (docs/benchmarks_train_kernels.md)
	$(PYTHON) -m benchmarks.train_step

bench-train:  ## whole training step, backend=sparse vs dense, S 0.5-0.95, 1 and 2 threads (docs/benchmarks_train.md)
	$(PYTHON) -m benchmarks.train_backend

bench-train-e2e:  ## the default training command at S = 0.9, backend=dense then sparse: wall time, final val loss
	$(PYTHON) -m benchmarks.train_e2e

sketch-features:  ## retrain the sketch metric's extractor on the bundled KanjiVG (a few minutes; prints its sha256)
	$(PYTHON) -m sparse_dm.train_sketch_features

sketch-metric:  ## validate fsd_kanjivg / ksd_kanjivg (floor, corruptions) into docs/sketch_metric.md: make sketch-metric SAMPLES="run/samples/*.npz"
	$(PYTHON) -m benchmarks.sketch_metric $(if $(SAMPLES),--samples $(SAMPLES))

report:  ## tables and plots of a finished sweep: make report SWEEP=multirun/demo_cpu_kanjivg
	$(PYTHON) -m sparse_dm.report sweep_dir=$(SWEEP) out=reports/$(notdir $(SWEEP))

clean:
	rm -rf outputs multirun wandb .pytest_cache .ruff_cache
