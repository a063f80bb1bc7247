# boxlite-csi developer entry points. `make test` is the README's test
# command and what CI runs.
GO        ?= go
FUZZTIME  ?= 30s
BENCHSTAT ?= $(GO) run golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
IMAGE     ?= ghcr.io/boxlite-csi/boxlite-csi:$(VERSION)

.PHONY: build run deps test lint unit fuzz bench image manifests e2e

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o bin/boxlite-csi ./cmd/boxlite-csi

run: build
	./bin/boxlite-csi

# The packages and pinned Go tools the tests use (hack/deps.sh): installed
# when run as root on Debian, otherwise only listed. The Go tools land in
# $(go env GOPATH)/bin, which the test targets put on PATH.
deps:
	./hack/deps.sh

export PATH := $(shell $(GO) env GOPATH)/bin:$(PATH)

# Everything CI checks: formatting and vet, unit tests under the race
# detector, then every fuzz target for FUZZTIME each. deps runs first, so a
# newcomer's first `sudo make test` runs the whole suite.
test: deps
	$(MAKE) lint unit fuzz

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) mod tidy -diff
	cd hack/k8s-schemas && $(GO) vet ./... && $(GO) mod tidy -diff
	cd test/e2e && $(GO) vet ./... && $(GO) mod tidy -diff

unit:
	$(GO) test -race -count=1 ./...
	cd hack/k8s-schemas && $(GO) test -race -count=1 ./...

fuzz:
	./hack/fuzz.sh $(FUZZTIME)

# The plugin image as an OCI archive, without a container engine (hack/image;
# the Dockerfile builds the same image with one). On a node:
#   ctr -n k8s.io images import bin/boxlite-csi-image.tar
image:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w -X main.version=$(VERSION)" -o bin/boxlite-csi-static ./cmd/boxlite-csi
	$(GO) run ./hack/image -binary bin/boxlite-csi-static -image $(IMAGE) -version $(VERSION) -out bin/boxlite-csi-image.tar

# The offline chart and manifest checks alone (`make unit` runs them too):
# helm lint/template, the values schema, kubeconform against schemas
# generated from k8s.io/kubernetes's OpenAPI document. Needs helm and
# kubeconform on PATH.
manifests:
	$(GO) test -count=1 ./test/manifests/

# The real-cluster end-to-end test (test/e2e, its own module): installs its
# Debian packages, builds Kubernetes, external-provisioner and
# external-snapshotter from the Go module proxy (cached under
# /var/cache/boxlite-e2e), brings a single-node cluster up on 127.0.0.1
# with the snapshot CRDs and snapshot-controller, installs the chart and
# runs the scenarios, then tears everything down. Root only; it skips,
# saying why, on a machine without the disk or memory for it.
e2e:
	./test/e2e/install-deps.sh
	cd test/e2e && $(GO) test -v -count=1 -timeout 60m .

# The README's benchmark commands, in order; about 5 minutes as root.
bench:
	$(GO) test -run '^$$' -bench BenchmarkCreateOverlay -count 10 ./pkg/qcow2/ | tee bench-qcow2.out
	$(BENCHSTAT) -col /writer bench-qcow2.out
	$(GO) test -run '^$$' -bench BenchmarkColdBuild -benchtime 3x -count 5 ./pkg/rootfs/ | tee bench-build.out
	$(GO) test -run '^$$' -bench BenchmarkWarmBox -benchtime 300x -count 5 ./pkg/rootfs/ | tee bench-box.out
	$(GO) test -run '^$$' -bench BenchmarkWarmStagePublish -benchtime 300x -count 3 ./pkg/driver/ | tee bench-stage.out
	$(GO) test -run '^$$' -bench BenchmarkSnapshot -benchtime 5x -count 3 ./pkg/driver/ | tee bench-snapshot.out
	$(BENCHSTAT) -col /op bench-snapshot.out
