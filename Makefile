# lazypull — build, test, benchmark.
GO ?= go
BIN := bin
GOFLAGS_BUILD := -trimpath
TEST_TIMEOUT ?= 60m

.PHONY: all build deps test test-unit vet fmt bench demo clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build $(GOFLAGS_BUILD) -o $(BIN)/lazypull ./cmd/lazypull
	@if [ -f cmd/snapshotter/main.go ]; then $(GO) build $(GOFLAGS_BUILD) -o $(BIN)/lazypull-snapshotter ./cmd/snapshotter; fi

# deps installs system packages (containerd, runc, fuse3, registry) and
# builds containerd 2.x for the integration tests. Needs root.
deps:
	./hack/install-deps.sh

vet:
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# test runs every test, integration tests included, with the race detector.
# Run it as root on a Debian 12 machine: it installs what it needs first.
test: deps build vet
	$(GO) test -race -timeout $(TEST_TIMEOUT) ./...
	./hack/fuzz-smoke.sh

test-unit:
	$(GO) test -race -short ./...

bench:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./estargz/

clean:
	rm -rf $(BIN)
