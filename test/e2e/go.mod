module github.com/boxlite-csi/boxlite-csi/test/e2e

go 1.26.0

require (
	github.com/boxlite-csi/boxlite-csi v0.0.0
	github.com/google/go-containerregistry v0.22.1
	golang.org/x/mod v0.41.0
	golang.org/x/sys v0.49.0
)

require (
	github.com/docker/cli v29.7.2+incompatible // indirect
	github.com/docker/docker-credential-helpers v0.9.3 // indirect
	github.com/go-logr/logr v1.4.4 // indirect
	github.com/klauspost/compress v1.20.1 // indirect
	github.com/moby/sys/mountinfo v0.7.2 // indirect
	github.com/opencontainers/go-digest v1.0.0 // indirect
	github.com/opencontainers/image-spec v1.1.1 // indirect
	github.com/sirupsen/logrus v1.9.4 // indirect
	golang.org/x/sync v0.23.0 // indirect
	k8s.io/klog/v2 v2.140.0 // indirect
	k8s.io/mount-utils v0.37.2 // indirect
	k8s.io/utils v0.0.0-20260707023825-cf1189d6abe3 // indirect
)

// pkg/qcow2 for the in-pod chain checker; internal/ packages cannot be
// imported from here and are not needed.
replace github.com/boxlite-csi/boxlite-csi => ../..
