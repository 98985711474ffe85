# node-mirror: `make run` runs the mirror, `make test` runs every test.
GO       ?= go
BIN      := bin/node-mirror
DATA_DIR ?= $(CURDIR)/data
LISTEN   ?= 127.0.0.1:5000
PKGS     := ./...

.PHONY: all build run test unit e2e conformance vet lint clean bench

all: build

build:
	$(GO) build -o $(BIN) ./cmd/node-mirror

# Runs the mirror in the foreground with the default registries and data under ./data.
run: build
	$(BIN) serve --listen $(LISTEN) --data-dir $(DATA_DIR)

# Every test tier: vet, unit + in-process integration (race), real engines, conformance.
test: vet unit e2e conformance

vet:
	$(GO) vet $(PKGS)

unit:
	$(GO) test -race -count=1 $$($(GO) list ./... | grep -v /test/)

e2e: build
	NODE_MIRROR_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 20m ./test/e2e/...

conformance: build
	NODE_MIRROR_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 10m ./test/conformance/...

# node-mirror against the reference registry's proxy mode and an nginx ceiling, on
# loopback; writes docs/BENCHMARKS.md. Needs docker-registry, nginx and containerd (root).
# BENCH_FLAGS=-quick for a fast rough run; `go run ./bench -h` lists the flags.
bench: build
	$(GO) run ./bench $(BENCH_FLAGS)

clean:
	rm -rf bin
