# lazypull — build, test, benchmark.
GO ?= go
BIN := bin
GOFLAGS_BUILD := -trimpath
TEST_TIMEOUT ?= 60m

.PHONY: all build deps test test-unit vet fmt bench bench-peer bench-reduced bench-micro demo clean

all: build

build:
	@mkdir -p $(BIN)
	$(GO) build $(GOFLAGS_BUILD) -o $(BIN)/lazypull ./cmd/lazypull
	$(GO) build $(GOFLAGS_BUILD) -o $(BIN)/lazypull-snapshotter ./cmd/snapshotter

# deps installs system packages (containerd, runc, fuse3, registry) and
# builds containerd 2.x for the integration tests. Needs root.
deps:
	./hack/install-deps.sh

vet:
	./hack/check-tracked.sh
	@test -z "$$(gofmt -l .)" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	$(GO) vet ./...

# test runs every test, integration tests included, with the race detector.
# Run it as root on a Debian 12 machine: it installs what it needs first.
test: deps build vet
	$(GO) test -race -timeout $(TEST_TIMEOUT) ./...
	./hack/fuzz-smoke.sh

test-unit:
	$(GO) test -race -short ./...

# demo is the main job: one image, one WAN profile, a lazy cold start
# against a full pull, in private containerd instances, with a timeline of
# every registry request (DEMO_OUT/report.html); then the same image on a
# "second node" (a fresh daemon and cache) that finds the start-up profile
# the first node pushed to the registry. Needs root.
DEMO_OUT ?= /tmp/lazypull-demo
demo: deps build
	$(BIN)/lazypull bench --preset hellobench:python --modes full-pull,lazypull,lazypull-second-node --wan 40ms,100Mbit --repeats 1 --out $(DEMO_OUT)

# bench is the full cold-start benchmark of the built-in images, every
# mode (full pull, lazypull plain and optimized, stargz-snapshotter v0.19.1,
# the second-node pair); results go to docs/benchmarks. Benchmark your own
# image with `lazypull bench`.
BENCH_IMAGES ?= python,gcc,node,pandas,large
BENCH_MODES ?= all
BENCH_WAN ?= --wan 40ms,100Mbit --wan 2ms,1Gbit
BENCH_REPEATS ?= 3
bench: deps build bench-peer
	$(BIN)/lazypull bench --preset hellobench:$(BENCH_IMAGES) --modes $(BENCH_MODES) $(BENCH_WAN) --repeats $(BENCH_REPEATS) --out docs/benchmarks

# bench-reduced is one image, one link, one repeat: full pull, lazypull
# and the peer (about 3 minutes with the image built).
bench-reduced: deps build bench-peer
	$(BIN)/lazypull bench --preset hellobench:python --modes full-pull,lazypull,stargz-snapshotter --wan 40ms,100Mbit --repeats 1 --out $(DEMO_OUT)-reduced

# bench-peer builds the peer the bench compares against,
# stargz-snapshotter's containerd-stargz-grpc, from its Go module via the
# bench's own module (bench/peer/stargz): lazypull's go.mod does not
# depend on it. `lazypull bench` finds it next to bin/lazypull.
bench-peer:
	@mkdir -p $(BIN)
	cd bench/peer/stargz && $(GO) build $(GOFLAGS_BUILD) -o $(CURDIR)/$(BIN)/containerd-stargz-grpc .

# bench-micro runs the Go benchmarks (format, cache, FUSE mount).
bench-micro:
	$(GO) test -run '^$$' -bench . -benchtime 3x ./estargz/ ./cache/ ./fs/

clean:
	rm -rf $(BIN)
