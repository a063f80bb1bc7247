module github.com/boxlite-csi/boxlite-csi/hack/k8s-schemas

go 1.26.0
