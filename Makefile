# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,s3,azure,gcs,tf,mpi,bench
SHELL_SCRIPTS := scripts/*.sh slurm/*.sh slurm/*.sbatch

.PHONY: setup test demo lint bench gpu-check clean

setup:
	@scripts/setup-env.sh $(EXTRAS)
	@scripts/build-horovod.sh

test: setup
	$(PY) -m ruff check forge_dist tests benchmarks scripts
	$(PY) -m ruff format --check forge_dist tests benchmarks scripts
	$(VENV)/bin/shellcheck -x $(SHELL_SCRIPTS)
	$(PY) -m pytest $(PYTEST_ARGS)

# The main job: a real 2-process data-parallel training with the consistent callbacks.
demo: setup
	$(VENV)/bin/forge-dist demo --fresh

lint: setup
	$(PY) -m ruff check forge_dist tests benchmarks scripts
	$(PY) -m ruff format --check forge_dist tests benchmarks scripts
	$(VENV)/bin/shellcheck -x $(SHELL_SCRIPTS)
	$(VENV)/bin/hadolint Dockerfile

# Benchmarks are not tests: they print ratios against a baseline measured in the same run,
# then benchmarks/report.py writes benchmarks/results.{json,md,png}. The larger models'
# save and resume (BENCH_SIZES, M parameters; from 400 M without S3, whose moto server
# holds objects in memory) take over an hour on 2 cores; `make bench BENCH_SIZES=` leaves
# them out.
BENCH_SIZES ?= 200 400

bench: setup
	$(PY) benchmarks/bench_store.py
	$(PY) benchmarks/bench_save.py
	$(PY) benchmarks/bench_keras.py
	$(PY) benchmarks/bench_hosts.py
	$(PY) benchmarks/bench_resume.py
	$(PY) benchmarks/bench_resume_ranks.py
	$(PY) benchmarks/bench_tiers.py
	for m in $(BENCH_SIZES); do \
	    $(PY) benchmarks/bench_save.py --params-m $$m --rounds 5 --steps 3 --no-orbax || exit 1; \
	    no_s3=; [ $$m -lt 400 ] || no_s3=--no-s3; \
	    $(PY) benchmarks/bench_resume.py --params-m $$m --rounds 3 $$no_s3 || exit 1; \
	done
	$(PY) benchmarks/report.py

# On a machine with a GPU (and TensorFlow built for it): MirroredStrategy over the visible
# GPUs, the demo, and the save and resume benchmarks with device-resident variables; a few
# minutes; writes benchmarks/out/gpu.{json,md}. `PY=python3 make gpu-check` uses another
# Python that has TensorFlow and forge_dist.
gpu-check:
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
