package manifests

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestHelmLint(t *testing.T) {
	requireTools(t, "helm")
	tests := []struct {
		name string
		args []string
	}{
		{"defaults", nil},
		{"no sidecars", []string{"-f", filepath.Join("testdata", "values-nosidecars.yaml")}},
		{"pull secret", []string{"--set", "storageClass.enabled=true,storageClass.image=registry.example.com/a/b:1,storageClass.pullSecret.name=regcred"}},
		{"snapshots", []string{"--set", "snapshotter.enabled=true,snapshotClass.create=true,snapshotClass.default=true"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"lint", "--strict", chartDir(t), "--namespace", releaseNS, "--kube-version", kubeVersion}, tt.args...)
			out := mustRun(t, ".", "helm", args...)
			if !strings.Contains(out, "0 chart(s) failed") {
				t.Errorf("helm lint did not report success:\n%s", out)
			}
		})
	}
}

// containerCheck is what one container of the DaemonSet must and must not
// contain, as YAML lines or fragments of them.
type containerCheck struct {
	name            string
	want, notWant   []string
	mounts          map[string][]string // volumeMount name -> lines its block must hold
	absent          bool                // the container must not be rendered
	envFrom         map[string]string   // env name -> a line of its block
	noLivenessProbe bool
	probes          map[string][]string // "livenessProbe:" or "readinessProbe:" -> lines its block must hold
}

func TestHelmTemplate(t *testing.T) {
	requireTools(t, "helm")
	const (
		microk8s  = "/var/snap/microk8s/common/var/lib/kubelet"
		defPlugin = "/var/lib/kubelet/plugins/csi.boxlite.dev"
	)
	provisionerFlags := []string{
		"- --node-deployment=true",
		"- --node-deployment-immediate-binding=false",
		"- --strict-topology=true",
		"- --immediate-topology=false",
		"- --enable-capacity=true",
		"- --capacity-ownerref-level=0",
	}
	rbacKinds := []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}

	tests := []struct {
		name       string
		args       []string
		kinds      []string // every kind rendered, in any order
		csiDriver  []string // lines the CSIDriver must hold
		daemonSet  []string // lines anywhere in the DaemonSet
		dsNotWant  []string
		containers []containerCheck
		// kind/name -> lines that object must hold
		objects map[string][]string
		// kind/name -> lines that object must not hold
		objectsNotWant map[string][]string
	}{
		{
			name:  "defaults",
			kinds: append([]string{"DaemonSet", "CSIDriver"}, rbacKinds...),
			csiDriver: []string{
				"attachRequired: false", "podInfoOnMount: true", "- Persistent", "- Ephemeral",
				"storageCapacity: true", "fsGroupPolicy: None",
			},
			daemonSet: []string{
				"automountServiceAccountToken: true", "hostNetwork: true", "dnsPolicy: ClusterFirstWithHostNet",
				"priorityClassName: system-node-critical", "- operator: Exists", "kubernetes.io/os: linux",
				"path: " + defPlugin, "path: /var/lib/kubelet/plugins_registry", "path: /var/lib/boxlite-csi",
			},
			dsNotWant: []string{"--feature-gates"},
			containers: []containerCheck{
				{
					name: "boxlite-csi",
					want: []string{
						"image: ghcr.io/boxlite-csi/boxlite-csi:0.1.0", "privileged: true",
						"- --endpoint=unix:///csi/csi.sock", "- --node-id=$(NODE_NAME)", "- --home=/var/lib/boxlite-csi",
						"- --driver-name=csi.boxlite.dev", "- --cache-high-watermark=0.85", "- --cache-low-watermark=0.7",
						"livenessProbe:", "readinessProbe:", "path: /healthz", "host: 127.0.0.1", "containerPort: 9856",
						"memory: 512Mi",
					},
					notWant: []string{"--kubelet-registration-path", "--plugin-registration-dir", "mountPath: /registration", "--cache-max-size", "--capacity-reserve", "--metrics-address", "POD_IP", "--image-max", "--local-image-root", "--allow-inline-insecure-registries", "--inline-node-credentials", "local-images"},
					mounts: map[string][]string{
						"kubelet-dir": {"mountPath: /var/lib/kubelet", "mountPropagation: Bidirectional"},
						"home":        {"mountPath: /var/lib/boxlite-csi", "mountPropagation: Bidirectional"},
						"socket-dir":  {"mountPath: /csi"},
					},
					envFrom: map[string]string{
						"NODE_NAME": "fieldPath: spec.nodeName",
						// 80% of 512Mi.
						"GOMEMLIMIT": `value: "429496729"`,
					},
				},
				{
					name: "node-driver-registrar",
					want: []string{
						"image: registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
						"- --kubelet-registration-path=" + defPlugin + "/csi.sock",
						"- --http-endpoint=127.0.0.1:9857", "allowPrivilegeEscalation: false",
					},
					notWant: []string{"privileged"},
					mounts:  map[string][]string{"registration-dir": {"mountPath: /registration"}},
				},
				{
					name:    "liveness-probe",
					want:    []string{"- --csi-address=/csi/csi.sock", "- --http-endpoint=127.0.0.1:9856"},
					notWant: []string{"privileged"},
				},
				{
					name:    "csi-provisioner",
					want:    append([]string{"image: registry.k8s.io/sig-storage/csi-provisioner:v6.4.0", "- --timeout=60s"}, provisionerFlags...),
					notWant: []string{"privileged", "--feature-gates", "--leader-election"},
					envFrom: map[string]string{
						"NODE_NAME": "fieldPath: spec.nodeName",
						"POD_NAME":  "fieldPath: metadata.name",
						// external-provisioner v6.4.0 reads exactly these
						// names (cmd/csi-provisioner); with capacity on it
						// exits without NAMESPACE.
						"NAMESPACE": "fieldPath: metadata.namespace",
					},
				},
				{name: "csi-snapshotter", absent: true},
			},
			objectsNotWant: map[string][]string{
				// Restores need these only where the snapshotter runs.
				"ClusterRole/boxlite-boxlite-csi-provisioner": {"snapshot.storage.k8s.io"},
			},
			objects: map[string][]string{
				"ClusterRole/boxlite-boxlite-csi-provisioner": {
					`resources: ["persistentvolumes"]`, `verbs: ["get", "list", "watch", "create", "patch", "delete"]`,
					`resources: ["persistentvolumeclaims"]`, `resources: ["storageclasses"]`, `resources: ["csinodes"]`,
					`resources: ["nodes"]`, `resources: ["events"]`,
				},
				"Role/boxlite-boxlite-csi-provisioner": {
					"namespace: " + releaseNS, `resources: ["csistoragecapacities"]`,
					`verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]`, `resources: ["pods"]`,
				},
			},
		},
		{
			name:  "no sidecars, microk8s, StorageClass",
			args:  []string{"-f", filepath.Join("testdata", "values-nosidecars.yaml")},
			kinds: []string{"DaemonSet", "CSIDriver", "StorageClass"},
			csiDriver: []string{
				// No provisioner publishes capacity, so the scheduler must not wait for it.
				"storageCapacity: false", "fsGroupPolicy: None",
			},
			daemonSet: []string{
				"automountServiceAccountToken: false",
				"path: " + microk8s + "/plugins/csi.boxlite.dev", "path: " + microk8s + "/plugins_registry", "path: " + microk8s,
			},
			dsNotWant: []string{"serviceAccountName", "path: /var/lib/kubelet", "=/var/lib/kubelet"},
			containers: []containerCheck{
				{
					name: "boxlite-csi",
					want: []string{
						"- --kubelet-registration-path=" + microk8s + "/plugins/csi.boxlite.dev/csi.sock",
						"- --plugin-registration-dir=/registration",
					},
					notWant: []string{"healthz", "ports:"},
					mounts: map[string][]string{
						"kubelet-dir":      {"mountPath: " + microk8s, "mountPropagation: Bidirectional"},
						"registration-dir": {"mountPath: /registration"},
					},
					noLivenessProbe: true,
				},
				{name: "node-driver-registrar", absent: true},
				{name: "liveness-probe", absent: true},
				{name: "csi-provisioner", absent: true},
			},
			objects: map[string][]string{
				"StorageClass/boxlite-busybox": {
					"provisioner: csi.boxlite.dev", `image: "127.0.0.1:5000/busybox:1"`, `plainHTTP: "true"`,
					`pullPolicy: "IfNotPresent"`, "volumeBindingMode: WaitForFirstConsumer", "reclaimPolicy: Delete",
				},
			},
		},
		{
			name: "pull secret, own network, custom memory",
			args: []string{"--set", strings.Join([]string{
				"storageClass.enabled=true", "storageClass.image=registry.example.com/team/vm:1",
				"storageClass.pullSecret.name=regcred", "hostNetwork=false",
				"resources.limits.memory=1Gi", "goMemLimitPercent=50",
				"cache.maxSize=20Gi", "capacityReserve=2Gi", "driverName=vm.example.com",
			}, ",")},
			kinds:     append([]string{"DaemonSet", "CSIDriver", "StorageClass", "Role", "RoleBinding"}, rbacKinds...),
			csiDriver: []string{"name: vm.example.com"},
			daemonSet: []string{"hostNetwork: false", "path: /var/lib/kubelet/plugins/vm.example.com"},
			dsNotWant: []string{"dnsPolicy", "host: 127.0.0.1"},
			containers: []containerCheck{
				{
					name:    "boxlite-csi",
					want:    []string{"- --cache-max-size=20Gi", "- --capacity-reserve=2Gi", "- --driver-name=vm.example.com"},
					envFrom: map[string]string{"GOMEMLIMIT": `value: "536870912"`},
				},
				{name: "liveness-probe", want: []string{"- --http-endpoint=:9856"}},
				{name: "node-driver-registrar", want: []string{"- --kubelet-registration-path=/var/lib/kubelet/plugins/vm.example.com/csi.sock"}},
			},
			objects: map[string][]string{
				"StorageClass/boxlite": {
					"provisioner: vm.example.com",
					`csi.storage.k8s.io/provisioner-secret-name: "regcred"`,
					`csi.storage.k8s.io/provisioner-secret-namespace: "` + releaseNS + `"`,
					`csi.storage.k8s.io/node-stage-secret-name: "regcred"`,
					`csi.storage.k8s.io/node-stage-secret-namespace: "` + releaseNS + `"`,
				},
				// Exactly that Secret, read-only.
				"Role/boxlite-boxlite-csi-pull-secret": {`resources: ["secrets"]`, `resourceNames: ["regcred"]`, `verbs: ["get"]`},
			},
		},
		{
			name: "metrics, PodMonitor, image limits",
			args: []string{"--set", strings.Join([]string{
				"metrics.enabled=true", "metrics.port=9900", "metrics.podMonitor.enabled=true",
				"metrics.podMonitor.labels.release=prom", "imageLimits.maxBytes=8Gi", "imageLimits.maxFiles=200000",
			}, ",")},
			kinds: append([]string{"DaemonSet", "CSIDriver", "PodMonitor"}, rbacKinds...),
			containers: []containerCheck{
				{
					name: "boxlite-csi",
					want: []string{
						"- --metrics-address=[$(POD_IP)]:9900", "- name: metrics", "containerPort: 9900",
						"- --image-max-bytes=8Gi", "- --image-max-files=200000",
						// The probe port stays next to the metrics one.
						"containerPort: 9856",
					},
					notWant: []string{"--image-max-file-size"},
					envFrom: map[string]string{"POD_IP": "fieldPath: status.podIP"},
				},
			},
			objects: map[string][]string{
				// Selects the plugin pods by the DaemonSet's selector labels
				// and scrapes the port by the name the container gives it.
				"PodMonitor/boxlite-boxlite-csi": {
					"apiVersion: monitoring.coreos.com/v1", "release: prom", "namespace: " + releaseNS,
					"app.kubernetes.io/name: boxlite-csi", "app.kubernetes.io/instance: boxlite",
					"- port: metrics", "path: /metrics", "interval: 30s",
				},
			},
		},
		{
			// Every probe timing and health port comes from values; the
			// timings not set here keep their defaults.
			name: "probe timings and health ports",
			args: []string{"--set", strings.Join([]string{
				"livenessProbe.port=9866", "livenessProbe.initialDelaySeconds=20", "livenessProbe.periodSeconds=15",
				"livenessProbe.timeoutSeconds=8", "livenessProbe.failureThreshold=4",
				"readinessProbe.initialDelaySeconds=3", "readinessProbe.periodSeconds=30", "readinessProbe.failureThreshold=2",
				"registrar.livenessProbe.port=9867", "registrar.livenessProbe.initialDelaySeconds=7",
				"registrar.livenessProbe.failureThreshold=5",
			}, ",")},
			kinds: append([]string{"DaemonSet", "CSIDriver"}, rbacKinds...),
			containers: []containerCheck{
				{
					name: "boxlite-csi",
					want: []string{"- name: healthz", "containerPort: 9866"},
					probes: map[string][]string{
						"livenessProbe:": {
							"port: healthz", "host: 127.0.0.1",
							"initialDelaySeconds: 20", "periodSeconds: 15", "timeoutSeconds: 8", "failureThreshold: 4",
						},
						"readinessProbe:": {
							"port: healthz", "host: 127.0.0.1",
							"initialDelaySeconds: 3", "periodSeconds: 30", "timeoutSeconds: 5", "failureThreshold: 2",
						},
					},
				},
				{name: "liveness-probe", want: []string{"- --http-endpoint=127.0.0.1:9866", "- --probe-timeout=4s"}},
				{
					name: "node-driver-registrar",
					want: []string{"- --http-endpoint=127.0.0.1:9867", "- name: registrar-hz", "containerPort: 9867"},
					probes: map[string][]string{
						"livenessProbe:": {
							"port: registrar-hz", "initialDelaySeconds: 7", "periodSeconds: 10", "timeoutSeconds: 5", "failureThreshold: 5",
						},
					},
				},
			},
		},
		{
			name:      "inline volumes may use local images and insecure registries",
			args:      []string{"--set", "inline.localImageRoot=/srv/images", "--set", "inline.allowInsecureRegistries=true", "--set", "inline.nodeCredentials=true"},
			kinds:     append([]string{"DaemonSet", "CSIDriver"}, rbacKinds...),
			daemonSet: []string{"path: /srv/images", "type: Directory"},
			containers: []containerCheck{
				{
					name: "boxlite-csi",
					want: []string{"- --local-image-root=/srv/images", "- --allow-inline-insecure-registries", "- --inline-node-credentials"},
					mounts: map[string][]string{
						"local-images": {"mountPath: /srv/images", "readOnly: true"},
					},
				},
			},
		},
		{
			name: "snapshotter and VolumeSnapshotClass",
			args: []string{"--set", strings.Join([]string{
				"snapshotter.enabled=true", "snapshotter.timeout=2m", "snapshotter.workerThreads=4",
				"snapshotter.extraArgs[0]=--retry-interval-max=1m",
				"snapshotClass.create=true", "snapshotClass.name=boxes", "snapshotClass.deletionPolicy=Retain",
				"snapshotClass.default=true", "snapshotClass.annotations.team=vm",
			}, ",")},
			kinds: append([]string{"DaemonSet", "CSIDriver", "VolumeSnapshotClass"}, rbacKinds...),
			containers: []containerCheck{
				{
					name: "csi-snapshotter",
					want: []string{
						"image: registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0", "- --csi-address=/csi/csi.sock",
						"- --node-deployment=true", "- --timeout=2m", "- --worker-threads=4", `- "--retry-interval-max=1m"`,
						"allowPrivilegeEscalation: false",
					},
					notWant: []string{"privileged", "--leader-election", "--feature-gates"},
					mounts:  map[string][]string{"socket-dir": {"mountPath: /csi"}},
					// external-snapshotter v8.7.0 exits at start-up with
					// --node-deployment and no NODE_NAME.
					envFrom: map[string]string{"NODE_NAME": "fieldPath: spec.nodeName"},
				},
				{name: "csi-provisioner", want: provisionerFlags},
			},
			objects: map[string][]string{
				"VolumeSnapshotClass/boxes": {
					"apiVersion: snapshot.storage.k8s.io/v1", "driver: csi.boxlite.dev", "deletionPolicy: Retain",
					`snapshot.storage.kubernetes.io/is-default-class: "true"`, "team: vm",
				},
				"ClusterRole/boxlite-boxlite-csi-snapshotter": {
					`resources: ["volumesnapshotcontents"]`, `verbs: ["get", "list", "watch", "update", "patch"]`,
					`resources: ["volumesnapshotcontents/status"]`, `verbs: ["update", "patch"]`,
					`resources: ["volumesnapshotclasses"]`, `resources: ["events"]`,
				},
				"ClusterRoleBinding/boxlite-boxlite-csi-snapshotter": {
					"name: boxlite-boxlite-csi", "namespace: " + releaseNS, "name: boxlite-boxlite-csi-snapshotter",
				},
				// Restores read the VolumeSnapshot and its content.
				"ClusterRole/boxlite-boxlite-csi-provisioner": {
					`resources: ["volumesnapshots"]`, `verbs: ["get", "list", "watch", "update"]`,
					`resources: ["volumesnapshotcontents"]`,
				},
			},
			objectsNotWant: map[string][]string{
				// No group snapshots, no leader election.
				"ClusterRole/boxlite-boxlite-csi-snapshotter": {`"groupsnapshot.storage.k8s.io"`, `"coordination.k8s.io"`, `resources: ["volumesnapshots"]`},
			},
		},
		{
			// The snapshotter alone still gets an identity and a token.
			name:      "snapshotter without provisioner",
			args:      []string{"--set", "provisioner.enabled=false,snapshotter.enabled=true"},
			kinds:     []string{"DaemonSet", "CSIDriver", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"},
			csiDriver: []string{"storageCapacity: false"},
			daemonSet: []string{"automountServiceAccountToken: true", "serviceAccountName: boxlite-boxlite-csi"},
			containers: []containerCheck{
				{name: "csi-provisioner", absent: true},
				{name: "csi-snapshotter", want: []string{"- --node-deployment=true"}},
			},
			objects: map[string][]string{
				"ClusterRole/boxlite-boxlite-csi-snapshotter": {`resources: ["volumesnapshotcontents/status"]`},
			},
		},
		{
			name:  "no memory limit, no GOMEMLIMIT",
			args:  []string{"--set", "resources.limits=null"},
			kinds: append([]string{"DaemonSet", "CSIDriver"}, rbacKinds...),
			containers: []containerCheck{
				{name: "boxlite-csi", notWant: []string{"GOMEMLIMIT", "limits:"}},
			},
		},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := mustRun(t, ".", "helm", helmTemplateArgs(t, tt.args...)...)
			docs := splitDocs(t, out)
			byKind := map[string][]manifest{}
			var kinds []string
			for _, d := range docs {
				byKind[d.kind] = append(byKind[d.kind], d)
				if !slices.Contains(kinds, d.kind) {
					kinds = append(kinds, d.kind)
				}
			}
			slices.Sort(kinds)
			want := slices.Clone(tt.kinds)
			slices.Sort(want)
			want = slices.Compact(want)
			if !slices.Equal(kinds, want) {
				t.Errorf("rendered kinds %v, want %v", kinds, want)
			}

			one := func(kind string) string {
				t.Helper()
				if len(byKind[kind]) != 1 {
					t.Fatalf("%d %s objects rendered, want 1", len(byKind[kind]), kind)
				}
				return byKind[kind][0].text
			}
			assertLines(t, "CSIDriver", one("CSIDriver"), tt.csiDriver, nil)
			ds := one("DaemonSet")
			assertLines(t, "DaemonSet", ds, tt.daemonSet, tt.dsNotWant)

			for _, c := range tt.containers {
				cb, ok := block(ds, "- name: "+c.name)
				// The same "- name:" could be a volume; containers come first
				// and carry an image.
				if ok && !strings.Contains(cb, "image: ") {
					ok = false
				}
				if c.absent {
					if ok {
						t.Errorf("container %s rendered, want it absent", c.name)
					}
					continue
				}
				if !ok {
					t.Errorf("container %s not rendered", c.name)
					continue
				}
				where := "container " + c.name
				assertLines(t, where, cb, c.want, c.notWant)
				if c.noLivenessProbe {
					assertLines(t, where, cb, nil, []string{"livenessProbe", "readinessProbe"})
				}
				for probe, lines := range c.probes {
					pb, ok := block(cb, probe)
					if !ok {
						t.Errorf("%s: no %s", where, probe)
						continue
					}
					assertLines(t, where+" "+probe, pb, lines, nil)
				}
				vm, _ := block(cb, "volumeMounts:")
				for mount, lines := range c.mounts {
					if lines == nil {
						continue
					}
					mb, ok := block(vm, "- name: "+mount)
					if !ok {
						t.Errorf("%s: no volumeMount %s", where, mount)
						continue
					}
					assertLines(t, where+" mount "+mount, mb, lines, nil)
				}
				env, _ := block(cb, "env:")
				for name, line := range c.envFrom {
					eb, ok := block(env, "- name: "+name)
					if !ok {
						t.Errorf("%s: no env %s", where, name)
						continue
					}
					assertLines(t, where+" env "+name, eb, []string{line}, nil)
				}
			}

			for key, lines := range tt.objects {
				kind, name, _ := strings.Cut(key, "/")
				var found bool
				for _, d := range byKind[kind] {
					if d.name == name {
						found = true
						assertLines(t, key, d.text, lines, nil)
					}
				}
				if !found {
					t.Errorf("%s not rendered", key)
				}
			}
			for key, lines := range tt.objectsNotWant {
				kind, name, _ := strings.Cut(key, "/")
				for _, d := range byKind[kind] {
					if d.name == name {
						assertLines(t, key, d.text, nil, lines)
					}
				}
			}
		})
	}
}

// assertLines checks that text contains every want fragment and none of
// notWant.
func assertLines(t *testing.T, where, text string, want, notWant []string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(text, w) {
			t.Errorf("%s: missing %q in:\n%s", where, w, text)
		}
	}
	for _, w := range notWant {
		if strings.Contains(text, w) {
			t.Errorf("%s: unexpected %q in:\n%s", where, w, text)
		}
	}
}

// TestValuesRejected checks that broken values fail install, template and
// lint with a message naming the problem, whether the values schema or a
// template check catches it.
func TestValuesRejected(t *testing.T) {
	requireTools(t, "helm")
	tests := []struct {
		name   string
		values string // a values file
		want   []string
		// byTemplate marks checks made by the templates (fail), not the
		// schema. helm lint renders in lint mode, where fail is logged as
		// "[INFO] Fail: ..." and does not fail the chart; install and
		// template do fail.
		byTemplate bool
	}{
		{name: "wrong type", values: "kubeletDir: 5\n", want: []string{"at '/kubeletDir': got number, want string"}},
		{name: "unknown key", values: "foo: bar\n", want: []string{"additional properties 'foo' not allowed"}},
		{name: "relative local image root", values: "inline:\n  localImageRoot: srv/images\n", want: []string{"at '/inline/localImageRoot'"}},
		{name: "unknown nested key", values: "provisioner:\n  timeOut: 30s\n", want: []string{"at '/provisioner'", "additional properties 'timeOut' not allowed"}},
		{name: "pull policy enum", values: "image:\n  pullPolicy: Sometimes\n", want: []string{"at '/image/pullPolicy'", "'Always', 'IfNotPresent', 'Never'"}},
		{name: "watermark range", values: "cache:\n  highWatermark: 1.5\n", want: []string{"at '/cache/highWatermark'"}},
		{name: "watermarks crossed", values: "cache:\n  highWatermark: 0.6\n  lowWatermark: 0.7\n", want: []string{"cache.lowWatermark (0.7) must be below cache.highWatermark (0.6)"}, byTemplate: true},
		{name: "relative kubelet dir", values: "kubeletDir: var/lib/kubelet\n", want: []string{"at '/kubeletDir'", "does not match pattern"}},
		{name: "bad size", values: "cache:\n  maxSize: 20GB\n", want: []string{"at '/cache/maxSize'", "does not match pattern"}},
		{name: "bad duration", values: "buildTimeout: 30 minutes\n", want: []string{"at '/buildTimeout'", "does not match pattern"}},
		{name: "StorageClass without image", values: "storageClass:\n  enabled: true\n", want: []string{"at '/storageClass/image'"}},
		{name: "Immediate binding", values: "storageClass:\n  volumeBindingMode: Immediate\n", want: []string{"at '/storageClass/volumeBindingMode'", "WaitForFirstConsumer"}},
		{name: "fractional memory limit", values: "resources:\n  limits:\n    memory: 1.5Gi\n", want: []string{"at '/resources/limits/memory'"}},
		{name: "sidecar switch as string", values: "registrar:\n  enabled: \"no\"\n", want: []string{"at '/registrar/enabled': got string, want boolean"}},
		{name: "PodMonitor without metrics", values: "metrics:\n  podMonitor:\n    enabled: true\n", want: []string{"metrics.podMonitor.enabled needs metrics.enabled"}, byTemplate: true},
		{name: "metrics port range", values: "metrics:\n  port: 70000\n", want: []string{"at '/metrics/port'"}},
		{name: "toleration operator", values: "tolerations:\n  - operator: Maybe\n", want: []string{"at '/tolerations/0/operator'"}},
		// The sidecar's key before it was renamed to livenessProbe.
		{name: "old livenessprobe key", values: "livenessprobe:\n  enabled: false\n", want: []string{"additional properties 'livenessprobe' not allowed"}},
		{name: "probe period zero", values: "readinessProbe:\n  periodSeconds: 0\n", want: []string{"at '/readinessProbe/periodSeconds'"}},
		{name: "registrar port range", values: "registrar:\n  livenessProbe:\n    port: 0\n", want: []string{"at '/registrar/livenessProbe/port'"}},
		{name: "snapshot class without snapshotter", values: "snapshotClass:\n  create: true\n", want: []string{"snapshotClass.create needs snapshotter.enabled"}, byTemplate: true},
		{name: "snapshot deletion policy enum", values: "snapshotClass:\n  deletionPolicy: Recycle\n", want: []string{"at '/snapshotClass/deletionPolicy'", "'Delete', 'Retain'"}},
		{name: "unknown snapshotter key", values: "snapshotter:\n  leaderElection: true\n", want: []string{"at '/snapshotter'", "additional properties 'leaderElection' not allowed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			values := writeTemp(t, "values.yaml", tt.values)
			for _, args := range [][]string{
				helmTemplateArgs(t, "-f", values),
				{"lint", "--strict", chartDir(t), "--kube-version", kubeVersion, "-f", values},
			} {
				r := run(t, ".", "helm", args...)
				lintOnly := tt.byTemplate && args[0] == "lint"
				if r.err == nil && !lintOnly {
					t.Errorf("helm %s accepted\n%s", args[0], tt.values)
					continue
				}
				// lint prints its findings on stdout, template on stderr.
				msg := r.stdout + r.stderr
				for _, w := range tt.want {
					if !strings.Contains(msg, w) {
						t.Errorf("helm %s: message lacks %q:\n%s", args[0], w, msg)
					}
				}
			}
		})
	}
}
