# node-mirror: `make run` runs the mirror, `make test` runs every test.
GO       ?= go
BIN      := bin/node-mirror
# The real-engine tiers run a race-detector build of the daemon, so every tier is checked under -race.
RACE_BIN := bin/node-mirror-race
# Empty: each fuzz target runs its own execution count (FUZZ_TARGETS). Set it (say 5m or
# 2000000x) to run every target for that long instead.
FUZZTIME ?=
# containerd 2.x for the real-engine tier (Debian ships 1.6), built once from its Go module.
CONTAINERD2_VERSION := v2.4.2
CONTAINERD2_DIR     := $(CURDIR)/.cache/containerd2-$(CONTAINERD2_VERSION)
# crictl drives containerd's CRI in the real-engine tier (Debian has no package), built once.
# internal/testenv's CrictlVersion names the same version, for runs outside make.
CRICTL_VERSION := v1.37.0
CRICTL_DIR     := $(CURDIR)/.cache/crictl-$(CRICTL_VERSION)
# Every fuzz target, as package:Target:executions. Counts, not durations: a duration-bounded
# run can fail with a bare "context deadline exceeded" when the -fuzztime deadline races a
# worker on a loaded machine (golang/go#75804, unfixed in Go 1.26). Each count is about ten
# seconds of fuzzing on an idle two-core machine.
FUZZ_TARGETS := ./pkg/mirror:FuzzParseRoute:60000x ./pkg/hosts:FuzzMergeHostsTOML:100000x \
                ./pkg/hosts:FuzzSetConfigPath:40000x ./pkg/hosts:FuzzMergeDaemonJSON:80000x \
                ./pkg/hosts:FuzzDropIn:60000x ./pkg/hosts:FuzzRegistryName:100000x \
                ./pkg/upstream/netguard:FuzzPolicy:400000x ./pkg/fleet:FuzzParseChunkRequest:100000x \
                ./pkg/fleet:FuzzParseManifestRequest:100000x ./pkg/fleet:FuzzParseMediaType:80000x
DATA_DIR ?= $(CURDIR)/data
LISTEN   ?= 127.0.0.1:5000
PKGS     := ./...
# make install: the binary goes to $(DESTDIR)$(PREFIX)/bin, the unit to $(DESTDIR)$(UNITDIR)
# (the administrator's unit directory, which systemd reads whatever PREFIX is), the example
# config to $(DESTDIR)$(CONFDIR)/config.toml unless one is there.
PREFIX   ?= /usr/local
DESTDIR  ?=
UNITDIR  ?= /etc/systemd/system
CONFDIR  ?= /etc/node-mirror

.PHONY: containerd2 crictl all build build-race run test unit e2e conformance fuzz soak vet clean bench install service-check

all: build

build:
	$(GO) build -o $(BIN) ./cmd/node-mirror

build-race:
	$(GO) build -race -o $(RACE_BIN) ./cmd/node-mirror

# Runs the mirror in the foreground with the default registries and data under ./data.
run: build
	$(BIN) serve --listen $(LISTEN) --data-dir $(DATA_DIR)

# Every test tier: vet, unit + in-process integration and soak (race), real engines,
# conformance, and a bounded run of every fuzz target.
test: vet unit e2e conformance fuzz service-check

vet:
	$(GO) vet $(PKGS)

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /test/)

$(CONTAINERD2_DIR)/containerd $(CONTAINERD2_DIR)/ctr:
	GOBIN=$(CONTAINERD2_DIR) $(GO) install -tags "no_btrfs no_devmapper no_zfs" \
	  github.com/containerd/containerd/v2/cmd/containerd@$(CONTAINERD2_VERSION) \
	  github.com/containerd/containerd/v2/cmd/ctr@$(CONTAINERD2_VERSION)

containerd2: $(CONTAINERD2_DIR)/containerd $(CONTAINERD2_DIR)/ctr

$(CRICTL_DIR)/crictl:
	GOBIN=$(CRICTL_DIR) $(GO) install sigs.k8s.io/cri-tools/cmd/crictl@$(CRICTL_VERSION)

crictl: $(CRICTL_DIR)/crictl

# Real engines, as root: containerd 1.6 and 2.4 (ctr and CRI through crictl), skopeo,
# Docker and Podman from Debian, each pulling through the daemon. The memory test in
# test/daemon measures a build without the race detector (NODE_MIRROR_PLAIN_BIN).
# test/fleet runs a fleet of daemons on loopback (kill -9 mid-pull, a late joiner).
e2e: build build-race containerd2 crictl
	CONTAINERD2_DIR=$(CONTAINERD2_DIR) CRICTL_BIN=$(CRICTL_DIR)/crictl NODE_MIRROR_BIN=$(CURDIR)/$(RACE_BIN) \
	  NODE_MIRROR_PLAIN_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 20m ./test/e2e/... ./test/daemon/... ./test/fleet/...

# Both versions of the OCI conformance suite, the current one and the 2023 one (built from
# the module proxy outside our go.mod), cold, warm and through the path prefix.
conformance: build-race
	NODE_MIRROR_BIN=$(CURDIR)/$(RACE_BIN) $(GO) test -count=1 -timeout 10m ./test/conformance/...

# The soak test alone, at the length CI uses.
soak:
	NODE_MIRROR_SOAK=2m $(GO) test -race -count=1 -timeout 10m -run TestSoak -v ./pkg/mirror

fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; rest=$${t#*:}; name=$${rest%%:*}; budget="$(FUZZTIME)"; budget=$${budget:-$${rest#*:}}; \
	  echo "fuzz $$name for $$budget"; \
	  $(GO) test -run '^$$' -fuzz "^$$name$$" -fuzztime "$$budget" "$$pkg"; \
	done

# Installs binary, systemd unit and (if absent) config; engines are configured by
# `node-mirror install`, which this does not run.
install: build
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/node-mirror
	sed 's|/usr/local/bin/node-mirror|$(PREFIX)/bin/node-mirror|g; s|/etc/node-mirror/config.toml|$(CONFDIR)/config.toml|g' \
	  systemd/node-mirror.service > $(DESTDIR)$(UNITDIR)/node-mirror.service.tmp
	chmod 0644 $(DESTDIR)$(UNITDIR)/node-mirror.service.tmp
	mv -f $(DESTDIR)$(UNITDIR)/node-mirror.service.tmp $(DESTDIR)$(UNITDIR)/node-mirror.service
	@if [ -e $(DESTDIR)$(CONFDIR)/config.toml ]; then \
	  echo "kept $(DESTDIR)$(CONFDIR)/config.toml"; \
	else \
	  install -m 0644 examples/config.toml $(DESTDIR)$(CONFDIR)/config.toml; \
	  echo "installed $(DESTDIR)$(CONFDIR)/config.toml"; \
	fi
	@echo
	@echo "Next, as root (docs/service.md):"
	@echo "  systemctl daemon-reload && systemctl enable --now node-mirror"
	@echo "  $(PREFIX)/bin/node-mirror install --config $(CONFDIR)/config.toml --dry-run   # review, then without --dry-run"

# The systemd unit: `systemd-analyze verify` clean and `systemd-analyze security` exposure
# at most 2.0 (systemd/service-check.sh), then the tests of make install, the unit's syscall
# filter against the running daemon, and the Kubernetes example (test/service).
service-check: build
	systemd/service-check.sh $(BIN) 2.0
	NODE_MIRROR_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 10m ./test/service/...

# node-mirror against the reference registry's proxy mode and an nginx ceiling, cold
# fetches against one stream, and a fleet against islands, on loopback; writes
# docs/BENCHMARKS.md. Needs docker-registry, nginx and containerd (root); the cold
# containerd pull also runs containerd 2.x (built once, as for e2e).
# BENCH_FLAGS=-quick for a fast rough run; `go run ./bench -h` lists the flags.
bench: build containerd2
	$(GO) run ./bench -containerd2-dir $(CONTAINERD2_DIR) $(BENCH_FLAGS)

clean:
	rm -rf bin
