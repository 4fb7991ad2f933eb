# femkin: two set-up commands on a fresh machine
#   make demo   create .venv, install femkin with DOLFINx, run cases/demo end to end
#   make test   create .venv, install, run the test suite serially and under mpirun -n 2
#   make lint   ruff (lint and format check) and mypy on the package (CI runs it before the tests)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
NP ?= 2
PYTEST_FLAGS ?= -q -ra

.PHONY: demo test test-serial test-mpi lint env benchmarks clean docker docker-check
env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	bash .ci/install "$(VENV)"
	touch $@

demo: env
	$(VENV)/bin/femkin run cases/demo

test: env
	$(MAKE) test-serial
	$(MAKE) test-mpi

LINT_PATHS := femkin tests benchmarks cases

lint: env
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy femkin

# One pytest process per group: a process can hold at most 2048 MPI communicators (MPICH), and
# every DOLFINx mesh and MUMPS factorisation that a test module keeps alive holds some; the whole
# suite in one process ran out of them. Exit code 5 (no test selected in a group) is not a failure.
TEST_GROUPS := tests/adjoint tests/inversion tests/io tests/meshing tests/physics tests/stxm \
	tests/robustness tests/uq tests/test_[a-m]*.py tests/test_[n-z]*.py

test-serial:
	@rc=0; for g in $(TEST_GROUPS); do echo "== $$g"; $(PY) -m pytest $(PYTEST_FLAGS) $$g; s=$$?; \
	if [ $$s -ne 0 ] && [ $$s -ne 5 ]; then rc=1; fi; done; exit $$rc

# Rank 0 reports; the other ranks log to build/pytest-rank<N>.log. Any rank failing fails the run.
test-mpi:
	mkdir -p build
	@rm -f build/pytest-rank*.log; rc=0; for g in $(TEST_GROUPS); do echo "== $$g (mpirun -n $(NP))"; \
	$(VENV)/bin/mpirun -n $(NP) bash -c 'if [ "$${PMI_RANK:-0}" = 0 ]; then exec $(PY) -m pytest $(PYTEST_FLAGS) -m mpi "$$@"; else exec $(PY) -m pytest -q -m mpi "$$@" >> build/pytest-rank$${PMI_RANK}.log 2>&1; fi' _ $$g; \
	s=$$?; if [ $$s -ne 0 ] && [ $$s -ne 5 ]; then rc=1; fi; done; exit $$rc

benchmarks: env
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

# Docker (not part of CI): docker/README.md. DOCKER_BASE swaps the base image (ARG BASE), e.g.
#   make docker-check DOCKER_BASE=<tag> DOCKER_BUILD_FLAGS="--network host"
IMAGE ?= femkin
DOCKER_BASE ?=
DOCKER_BUILD_FLAGS ?=
docker:
	docker build $(DOCKER_BUILD_FLAGS) $(if $(DOCKER_BASE),--build-arg BASE=$(DOCKER_BASE)) \
	  -t $(IMAGE) -f docker/Dockerfile .

# Build, then run cases/stacks on the host and in the image (serially and under mpirun -n 2, as a
# non-root user) and compare the summary.json files.
docker-check: docker env
	bash docker/check.sh $(IMAGE) $(VENV)/bin/femkin

clean:
	rm -rf $(VENV) build
