# The two commands:  make reproduce  (every notebook, default profile, results under outputs/)
#                    make test       (pytest + nbval on the notebooks' quick defaults)
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= default
BIN := $(VENV)/bin
NOTEBOOKS := $(wildcard notebooks/[0-9]*.ipynb)

.PHONY: setup reproduce test lint clean

# torch first and pinned: a looser spec (or letting a dependency pull it) fetches a multi-GB CUDA build. Then
# readlib with its dev and notebooks extras at the exact versions of constraints.txt (pyproject.toml has ranges).
$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,notebooks]"
	touch $@

setup: $(BIN)/.installed

# notebook 03 runs once per bundled task of READ Table 1; the last run's tables cover all of them. Notebook 04 has no
# profile (shapes and timings only): the notebooks' parameter check refuses a -p name a notebook does not define.
GLUE_TASKS ?= cola sst2 mrpc stsb

reproduce: setup
	mkdir -p outputs/notebooks
	for nb in $(NOTEBOOKS); do \
		case $$(basename $$nb) in \
		03_glue.ipynb) for task in $(GLUE_TASKS); do \
			$(BIN)/papermill $$nb outputs/notebooks/03_glue_$$task.ipynb -p profile $(PROFILE) -p task $$task \
				--cwd notebooks || exit 1; \
			done ;; \
		04_scaling.ipynb) $(BIN)/papermill $$nb outputs/notebooks/$$(basename $$nb) --cwd notebooks || exit 1 ;; \
		*) $(BIN)/papermill $$nb outputs/notebooks/$$(basename $$nb) -p profile $(PROFILE) --cwd notebooks || exit 1 ;; \
		esac; \
	done
	$(BIN)/python -m readlib report --profile $(PROFILE)

# Each stage prints its wall time. Tests and notebooks run in TEST_WORKERS processes (pytest-xdist, a file per
# process at a time), each on one thread: on 2 cores that halves the wall time, and single-threaded kernels do
# not spin-wait on each other. nbval's default cell limit (2000 s) is too short for a slow shared CPU.
TEST_WORKERS ?= 2
test: setup
	@start=$$(date +%s); $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations 15 tests; rc=$$?; \
		echo "make test: pytest took $$(( $$(date +%s) - start )) s"; exit $$rc
	@start=$$(date +%s); OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile \
		--nbval-lax --nbval-cell-timeout 7200 notebooks; rc=$$?; \
		echo "make test: nbval (notebooks) took $$(( $$(date +%s) - start )) s"; exit $$rc

lint: setup
	$(BIN)/ruff check readlib tests bench

clean:
	rm -rf outputs
