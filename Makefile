# boxlite-csi developer entry points. `make test` is the README's test
# command and what CI runs.
GO        ?= go
FUZZTIME  ?= 30s
BENCHSTAT ?= $(GO) run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

.PHONY: build run test lint unit fuzz bench

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/boxlite-csi ./cmd/boxlite-csi

run: build
	./bin/boxlite-csi

# Everything CI checks: formatting and vet, unit tests under the race
# detector, then every fuzz target for FUZZTIME each.
test: lint unit fuzz

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) mod tidy -diff

unit:
	$(GO) test -race -count=1 ./...

fuzz:
	./hack/fuzz.sh $(FUZZTIME)

# The README's benchmark commands, in order; about 5 minutes as root.
bench:
	$(GO) test -run '^$$' -bench BenchmarkCreateOverlay -count 10 ./pkg/qcow2/ | tee bench-qcow2.out
	$(BENCHSTAT) -col /writer bench-qcow2.out
	$(GO) test -run '^$$' -bench BenchmarkColdBuild -benchtime 3x -count 5 ./pkg/rootfs/ | tee bench-build.out
	$(GO) test -run '^$$' -bench BenchmarkWarmBox -benchtime 300x -count 5 ./pkg/rootfs/ | tee bench-box.out
	$(GO) test -run '^$$' -bench BenchmarkWarmStagePublish -benchtime 300x -count 3 ./pkg/driver/ | tee bench-stage.out
