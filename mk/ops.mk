# echod: operations targets, included by the top Makefile (which defines PY, VENV, BIN).
#
#   make install     (root) self-contained venv in /opt/echod, /usr/local/bin links, user echod,
#                    /etc/echod/echod.toml (only if absent), the systemd unit; then checks that
#                    the echod user can run echod before saying it is ready to start
#   make uninstall   (root) removes exactly what install recorded in its manifest
#   make install-extras  (root; install runs it) the man pages from man/ (echod(8), echoctl(1)
#                    and one per echoctl command) and bash completion for echoctl, recorded
#                    in the manifest of an existing install
#   make check-unit  systemd-analyze verify + offline security score of systemd/echod.service
#
# install writes one "KIND PATH [SHA256]" line per thing it created to $(ECHOD_MANIFEST);
# uninstall undoes them in reverse. Things that existed before install (a user, a config
# file) are never recorded, so never removed; a config file edited since install is kept.

ECHOD_OPT      ?= /opt/echod
ECHOD_ETC      ?= /etc/echod
ECHOD_BINDIR   ?= /usr/local/bin
ECHOD_UNITDIR  ?= /etc/systemd/system
ECHOD_MANDIR   ?= /usr/local/share/man
ECHOD_COMPLETIONDIR ?= /usr/share/bash-completion/completions
ECHOD_USER     ?= echod
# The interpreter the /opt/echod venv is built from. It must be one the echod user can run and
# the unit can see: not a pyenv or other build under /root or /home, which ProtectHome= hides.
ECHOD_PYTHON   ?= /usr/bin/python3
ECHOD_MANIFEST := $(ECHOD_OPT)/.install-manifest
# The highest `systemd-analyze security` exposure check-unit accepts, x10 (25 = 2.5).
ECHOD_MAX_EXPOSURE ?= 25

.PHONY: install install-extras uninstall check-unit

install:
	@test "$$(id -u)" = 0 || { echo "make install: run as root" >&2; exit 1; }
	@set -eu; \
	m=$(ECHOD_MANIFEST); \
	record() { grep -qxF "$$*" "$$m" 2>/dev/null || echo "$$*" >> "$$m"; }; \
	if [ ! -d $(ECHOD_OPT) ]; then \
		mkdir -p $(ECHOD_OPT); : > "$$m"; record dir $(ECHOD_OPT); \
	elif [ ! -f "$$m" ]; then \
		echo "make install: $(ECHOD_OPT) exists but has no install manifest; not touching it" >&2; \
		exit 1; \
	fi; \
	py=$$(command -v $(ECHOD_PYTHON)) || { \
		echo "make install: no interpreter $(ECHOD_PYTHON); set ECHOD_PYTHON=/path/to/python3" >&2; \
		exit 1; }; \
	want=$$(readlink -f "$$py"); \
	have=$$(readlink -f $(ECHOD_OPT)/bin/python3 2>/dev/null || true); \
	if [ -n "$$have" ] && [ "$$have" != "$$want" ]; then \
		echo "venv: rebuilding $(ECHOD_OPT) on $$want (was $$have)"; \
		rm -rf $(ECHOD_OPT)/bin $(ECHOD_OPT)/lib $(ECHOD_OPT)/lib64 $(ECHOD_OPT)/include \
			$(ECHOD_OPT)/pyvenv.cfg; \
	fi; \
	echo "venv: $(ECHOD_OPT) (python: $$want)"; \
	"$$py" -m venv $(ECHOD_OPT); \
	$(ECHOD_OPT)/bin/pip install --quiet .; \
	install -D -m 0644 docs/operations.md $(ECHOD_OPT)/share/doc/echod/operations.md; \
	for tool in echod echoctl; do \
		if [ -e $(ECHOD_BINDIR)/$$tool ] && [ ! -L $(ECHOD_BINDIR)/$$tool ]; then \
			echo "make install: $(ECHOD_BINDIR)/$$tool exists and is not our link" >&2; exit 1; \
		fi; \
		ln -sfn $(ECHOD_OPT)/bin/$$tool $(ECHOD_BINDIR)/$$tool; \
		record link $(ECHOD_BINDIR)/$$tool; \
	done; \
	if ! getent group $(ECHOD_USER) >/dev/null; then \
		groupadd --system $(ECHOD_USER); record group $(ECHOD_USER); \
	fi; \
	if ! getent passwd $(ECHOD_USER) >/dev/null; then \
		useradd --system --gid $(ECHOD_USER) --no-create-home --home-dir / \
			--shell /usr/sbin/nologin --comment "echod TCP echo daemon" $(ECHOD_USER); \
		record user $(ECHOD_USER); \
	fi; \
	if [ ! -d $(ECHOD_ETC) ]; then \
		install -d -m 0755 $(ECHOD_ETC); record dir $(ECHOD_ETC); \
	fi; \
	if [ -e $(ECHOD_ETC)/echod.toml ]; then \
		echo "config: keeping the existing $(ECHOD_ETC)/echod.toml"; \
	else \
		install -m 0644 systemd/echod.toml $(ECHOD_ETC)/echod.toml; \
		record conf $(ECHOD_ETC)/echod.toml $$(sha256sum < $(ECHOD_ETC)/echod.toml | cut -d' ' -f1); \
		echo "config: $(ECHOD_ETC)/echod.toml"; \
	fi; \
	install -m 0644 systemd/echod.service $(ECHOD_UNITDIR)/echod.service; \
	record file $(ECHOD_UNITDIR)/echod.service; \
	echo "unit: $(ECHOD_UNITDIR)/echod.service"; \
	$(MAKE) --no-print-directory -f mk/ops.mk install-extras; \
	fail() { \
		echo "make install: the $(ECHOD_USER) user cannot start $(ECHOD_BINDIR)/echod: $$1" >&2; \
		echo "  the venv's interpreter is $$want; rebuild it from one under /usr," \
			"e.g. make install ECHOD_PYTHON=/usr/bin/python3" >&2; \
		exit 1; }; \
	if ! out=$$(cd / && runuser -u $(ECHOD_USER) -- $(ECHOD_BINDIR)/echod --version 2>&1); then \
		fail "$$(echo "$$out" | tail -n 1)"; \
	fi; \
	case $$want in \
	/root/*|/home/*|/run/user/*) fail "ProtectHome=yes in echod.service hides $$want";; \
	esac; \
	echo "check: $$out, runs as $(ECHOD_USER)"; \
	if [ -d /run/systemd/system ]; then \
		systemctl daemon-reload; \
		echo "next: systemctl enable --now echod   (or: systemctl restart echod)"; \
	else \
		echo "systemd is not running here: skipped systemctl daemon-reload"; \
	fi

# Man pages are generated from the click commands (make man) and committed; completion is
# generated here by the installed echoctl itself. Directories it creates are recorded too.
install-extras:
	@test "$$(id -u)" = 0 || { echo "make install-extras: run as root" >&2; exit 1; }
	@set -eu; \
	m=$(ECHOD_MANIFEST); \
	test -f "$$m" || { echo "make install-extras: no $$m; run make install" >&2; exit 1; }; \
	record() { grep -qxF "$$*" "$$m" 2>/dev/null || echo "$$*" >> "$$m"; }; \
	newdir() { if [ ! -d "$$1" ]; then newdir "$$(dirname "$$1")"; \
		install -d -m 0755 "$$1"; record dir "$$1"; fi; }; \
	for page in man/*.1 man/*.8; do \
		dir=$(ECHOD_MANDIR)/man$${page##*.}; newdir "$$dir"; \
		install -m 0644 "$$page" "$$dir/"; record file "$$dir/$${page##*/}"; \
	done; \
	echo "man: $(ECHOD_MANDIR)/man8/echod.8, man1/echoctl.1 and one page per echoctl command"; \
	newdir $(ECHOD_COMPLETIONDIR); \
	_ECHOCTL_COMPLETE=bash_source $(ECHOD_OPT)/bin/echoctl > $(ECHOD_COMPLETIONDIR)/echoctl; \
	record file $(ECHOD_COMPLETIONDIR)/echoctl; \
	echo "completion: $(ECHOD_COMPLETIONDIR)/echoctl (bash)"

uninstall:
	@test "$$(id -u)" = 0 || { echo "make uninstall: run as root" >&2; exit 1; }
	@set -eu; \
	m=$(ECHOD_MANIFEST); \
	if [ ! -f "$$m" ]; then echo "make uninstall: no $$m; nothing to do" >&2; exit 0; fi; \
	if [ -d /run/systemd/system ] && systemctl list-unit-files echod.service >/dev/null 2>&1; then \
		systemctl disable --now echod.service 2>/dev/null || true; \
	fi; \
	tac "$$m" | while read -r kind path sum; do \
		case $$kind in \
		link|file) rm -f "$$path"; echo "removed $$path";; \
		conf) \
			if [ -f "$$path" ] && [ "$$(sha256sum < "$$path" | cut -d' ' -f1)" = "$$sum" ]; then \
				rm -f "$$path"; echo "removed $$path"; \
			elif [ -e "$$path" ]; then echo "kept $$path (edited since install)"; fi;; \
		user) userdel "$$path" && echo "removed user $$path";; \
		group) if getent group "$$path" >/dev/null; then groupdel "$$path"; fi; \
			echo "removed group $$path";; \
		dir) \
			if [ "$$path" = "$(ECHOD_OPT)" ]; then rm -rf "$$path"; echo "removed $$path"; \
			else rmdir "$$path" 2>/dev/null && echo "removed $$path" || echo "kept $$path (not empty)"; fi;; \
		*) echo "make uninstall: unknown manifest line: $$kind $$path" >&2;; \
		esac; \
	done; \
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# verify needs ExecStart= and ExecReload= to exist: check a copy that points them at a binary
# that surely does.
check-unit:
	@set -eu; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	sed 's|^\(Exec[A-Za-z]*=\)/usr/local/bin/[^ ]*|\1/bin/true|' systemd/echod.service \
		> "$$tmp/echod.service"; \
	systemd-analyze verify "$$tmp/echod.service"; \
	systemd-analyze security --offline=true --threshold=$(ECHOD_MAX_EXPOSURE) \
		systemd/echod.service | tail -n 1
