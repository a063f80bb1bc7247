# syntax=docker/dockerfile:1
#
# The boxlite-csi plugin image: a static binary and a CA bundle on scratch.
# hack/image builds the same image without a container engine (same files,
# modes, entrypoint, user and labels) from a binary built the same way.
#
#   docker build --build-arg VERSION=$(git describe --tags --always) -t ghcr.io/boxlite-csi/boxlite-csi:dev .
#
# Multi-arch: docker buildx build --platform linux/amd64,linux/arm64 ...
# (the build stage runs natively and cross-compiles).

ARG GO_VERSION=1.26

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION}-bookworm AS build
ARG TARGETOS=linux
ARG TARGETARCH
ARG VERSION=dev
WORKDIR /src
# Modules first, so source edits reuse the download layer.
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
# Only what the binary is built from (there is no .dockerignore).
COPY cmd/ cmd/
COPY pkg/ pkg/
# CGO_ENABLED=0: a static binary, because the final image has no libc.
# -trimpath and -s -w: no local paths or symbol tables in the image.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=${TARGETOS} GOARCH=${TARGETARCH} \
    go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/boxlite-csi ./cmd/boxlite-csi

# scratch: the plugin needs no shell or tools. Mounts are mount(2) calls and
# the base-disk builder is pure Go (no e2fsprogs). It does pull images over
# TLS, hence the CA bundle.
FROM scratch
ARG VERSION=dev
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build --chmod=0755 /out/boxlite-csi /boxlite-csi
# Root, explicitly: the plugin makes bind mounts (it runs privileged).
USER 0
ENTRYPOINT ["/boxlite-csi"]
LABEL org.opencontainers.image.title="boxlite-csi" \
      org.opencontainers.image.description="CSI node plugin for micro-VM sandboxes: qcow2 boxes over shared read-only base disks" \
      org.opencontainers.image.source="https://github.com/boxlite-csi/boxlite-csi" \
      org.opencontainers.image.version="${VERSION}"
