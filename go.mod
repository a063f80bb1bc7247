module github.com/boxlite-csi/boxlite-csi

go 1.26.0

require (
	golang.org/x/sys v0.49.0
	k8s.io/klog/v2 v2.140.0
)

require github.com/go-logr/logr v1.4.3 // indirect
