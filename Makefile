# echod: the developer entry points. `make run` and `make test` are the README's two commands.
# The dev venv (.venv, with the dev and plot extras) uses PY; `make install` uses ECHOD_PYTHON.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := clang-14 llvm-14 bpftool libbpf-dev linux-libc-dev iproute2 util-linux \
	systemd systemd-container socat ncat netcat-openbsd strace tmux groff-base man-db

.PHONY: venv deps run test unit integration lint bpf check-bpf bench soak manyconns cpaths userspeed udpspeed man \
	clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plot]'
	touch $@

# System packages the build check and the integration tests use (Debian; root only).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: $$missing (run as root, or apt-get install them)" >&2; exit 1; fi; \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The TCP port of run, bench and cpaths: make bench PORT=9000 (empty: run's 8888, and a free
# port for bench and cpaths). Only the command line sets it, never an inherited $PORT.
PORT =
PORT_FLAG = $(if $(PORT),--port $(PORT))

# The embedded defaults: mk/embedded.toml is empty, so /etc/echod/echod.toml is not read.
# Extra daemon flags: make run ARGS="--port 9000 --mode user" (or ARGS="--config FILE").
ARGS ?=
run: venv
	$(BIN)/echod --config mk/embedded.toml $(PORT_FLAG) $(ARGS)

lint: venv
	$(BIN)/ruff check echod ctl tests
	$(BIN)/ruff format --check echod ctl tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

bpf:
	$(MAKE) -C bpf

check-bpf: deps
	$(MAKE) -s -C bpf check

unit: venv
	$(BIN)/pytest tests/unit

integration: venv deps
	$(BIN)/pytest tests/integration

test: venv deps lint check-bpf
	$(BIN)/pytest tests

BENCH_ARGS ?= -c 10 -s 64 -d 5 --repeat 3
bench: venv
	$(BIN)/echoctl compare --spawn $(PORT_FLAG) $(BENCH_ARGS)

# The four paths against a C ping-pong client (root, BPF; clang-14 builds the client).
CPATHS_ARGS ?= --rounds 3 --seconds 5 --workers 1
cpaths: venv
	$(BIN)/python -m tests.cpaths $(PORT_FLAG) $(CPATHS_ARGS)

# echod's user and kernel modes against a C epoll server (tests/cclient/epollecho.c), side by
# side: 10 x 64 B, 1 x 64 B and connection churn (root for kernel mode; clang-14 builds both).
USERSPEED_ARGS ?= --rounds 3 --seconds 5
userspeed: venv
	$(BIN)/python -m tests.userspeed $(USERSPEED_ARGS)

# UDP flood, user mode against the kernel path, the client in a network namespace on CPU 0 and
# echod on CPU 1 (root, BPF, TCX; clang-14 builds the client).
UDPSPEED_ARGS ?= --rounds 5 --seconds 5
udpspeed: venv
	$(BIN)/python -m tests.udpspeed $(UDPSPEED_ARGS)

# The long live-switch soak (root, BPF): 4 runs x 20 switches x 50 streams, 120 s each.
SOAK_ARGS ?= --runs 4 --switches 20 --connections 50 --duration 120
soak: venv
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

# 100,000 concurrent connections (root, BPF): six clients, six workers, every echo checked,
# then RSS per connection and idle CPU of all the daemon's processes.
MANY_ARGS ?= --connections 100000 --clients 6 --workers 6 --idle 10
manyconns: venv
	$(BIN)/python -m tests.manyconns $(MANY_ARGS) --mode kernel
	$(BIN)/python -m tests.manyconns $(MANY_ARGS) --mode user

# The man pages in man/, from the click commands (click-man; committed, and checked by
# tests/unit/test_ctl_manpages.py). make install installs them.
man: venv
	$(BIN)/python mk/manpages.py man

include mk/ops.mk

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
