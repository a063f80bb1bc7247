{{/*
The DaemonSet's containers, one named template each. daemonset.yaml lists
them in order. Every container reaches the plugin through its socket in the
socket-dir volume, mounted at /csi.
*/}}

{{/*
An HTTP GET of /healthz on a named container port, with the timings of one
probe's values. Takes a dict:
  port    the container port's name
  host    the address the endpoint listens on; empty for the pod IP
  timings the probe's values (initialDelaySeconds, periodSeconds,
          timeoutSeconds, failureThreshold)
*/}}
{{- define "boxlite-csi.healthzProbe" -}}
httpGet:
  path: /healthz
  port: {{ .port }}
  {{- with .host }}
  host: {{ . }}
  {{- end }}
initialDelaySeconds: {{ .timings.initialDelaySeconds }}
periodSeconds: {{ .timings.periodSeconds }}
timeoutSeconds: {{ .timings.timeoutSeconds }}
failureThreshold: {{ .timings.failureThreshold }}
{{- end -}}

{{/*
The plugin's command-line flags. Optional flags are left out when their
value is empty, so the plugin's own defaults apply.
*/}}
{{- define "boxlite-csi.pluginArgs" -}}
- --endpoint=unix:///csi/csi.sock
- --node-id=$(NODE_NAME)
- --driver-name={{ .Values.driverName }}
- --home={{ .Values.home }}
- --v={{ .Values.logVerbosity }}
- --cache-high-watermark={{ .Values.cache.highWatermark }}
- --cache-low-watermark={{ .Values.cache.lowWatermark }}
{{- with .Values.cache.maxSize }}
- --cache-max-size={{ . }}
{{- end }}
- --cache-grace={{ .Values.cache.grace }}
- --eviction-interval={{ .Values.cache.evictionInterval }}
- --build-timeout={{ .Values.buildTimeout }}
- --max-concurrent-builds={{ .Values.maxConcurrentBuilds }}
{{- with .Values.capacityReserve }}
- --capacity-reserve={{ . }}
{{- end }}
{{- with .Values.maxVolumeSize }}
- --max-volume-size={{ . }}
{{- end }}
- --overprovision-ratio={{ .Values.overprovisionRatio }}
- --max-volumes-per-node={{ .Values.maxVolumesPerNode }}
{{- if not .Values.registrar.enabled }}
# Without node-driver-registrar the plugin answers kubelet's plugin
# watcher itself. kubelet dials the socket by its path on the host.
- --kubelet-registration-path={{ include "boxlite-csi.pluginDir" . }}/csi.sock
- --plugin-registration-dir=/registration
{{- end }}
{{- with .Values.imageLimits.maxBytes }}
- --image-max-bytes={{ . }}
{{- end }}
{{- with .Values.imageLimits.maxFileSize }}
- --image-max-file-size={{ . }}
{{- end }}
{{- with .Values.imageLimits.maxFiles }}
- --image-max-files={{ . }}
{{- end }}
{{- with .Values.inline.localImageRoot }}
- --local-image-root={{ . }}
{{- end }}
{{- if .Values.inline.allowInsecureRegistries }}
- --allow-inline-insecure-registries
{{- end }}
{{- if .Values.inline.nodeCredentials }}
- --inline-node-credentials
{{- end }}
{{- if .Values.metrics.enabled }}
# The brackets keep an IPv6 pod IP apart from the port. Go accepts them
# around an IPv4 address too.
- --metrics-address=[$(POD_IP)]:{{ .Values.metrics.port }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
The plugin container: the CSI node and controller services on /csi/csi.sock.
*/}}
{{- define "boxlite-csi.pluginContainer" -}}
{{- $healthHost := include "boxlite-csi.healthHost" . -}}
{{- $goMemLimit := include "boxlite-csi.goMemLimit" . -}}
- name: boxlite-csi
  image: {{ include "boxlite-csi.image" (dict "repository" .Values.image.repository "tag" (.Values.image.tag | default .Chart.AppVersion)) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    {{- include "boxlite-csi.pluginArgs" . | nindent 4 }}
  env:
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    {{- if .Values.metrics.enabled }}
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    {{- end }}
    {{- if $goMemLimit }}
    # {{ .Values.goMemLimitPercent }}% of the {{ .Values.resources.limits.memory }} memory limit, in bytes.
    - name: GOMEMLIMIT
      value: {{ $goMemLimit | quote }}
    {{- end }}
  securityContext:
    # Privileged, not just CAP_SYS_ADMIN, because the API server allows
    # mountPropagation: Bidirectional only in privileged containers. The
    # plugin needs it for its bind mounts: the staging and publish paths
    # under the kubelet directory, and the read-only base inside each box in
    # the home. Without it those mounts would stay in this container's
    # mount namespace, where neither kubelet nor the box's pods see them.
    privileged: true
    readOnlyRootFilesystem: true
  {{- if or .Values.livenessProbe.enabled .Values.metrics.enabled }}
  ports:
    {{- if .Values.livenessProbe.enabled }}
    # Served by the livenessprobe sidecar, which shares this pod's network.
    - name: healthz
      containerPort: {{ .Values.livenessProbe.port }}
      protocol: TCP
    {{- end }}
    {{- if .Values.metrics.enabled }}
    - name: metrics
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
    {{- end }}
  {{- end }}
  {{- if .Values.livenessProbe.enabled }}
  livenessProbe:
    {{- include "boxlite-csi.healthzProbe" (dict "port" "healthz" "host" $healthHost "timings" .Values.livenessProbe) | nindent 4 }}
  readinessProbe:
    {{- include "boxlite-csi.healthzProbe" (dict "port" "healthz" "host" $healthHost "timings" .Values.readinessProbe) | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
    - name: kubelet-dir
      mountPath: {{ .Values.kubeletDir }}
      mountPropagation: Bidirectional
    # Bidirectional too, because a staged box has its base disk bind-mounted
    # read-only onto itself under the home. Made in the host's mount
    # namespace, that mount is the one kubelet and the pods see, and it
    # survives a plugin restart. The plugin keeps no record of its mounts:
    # it reads them back from /proc/self/mountinfo.
    - name: home
      mountPath: {{ .Values.home }}
      mountPropagation: Bidirectional
    {{- if not .Values.registrar.enabled }}
    - name: registration-dir
      mountPath: /registration
    {{- end }}
    {{- with .Values.inline.localImageRoot }}
    - name: local-images
      mountPath: {{ . }}
      readOnly: true
    {{- end }}
{{- end -}}

{{/*
node-driver-registrar: registers the plugin's socket with kubelet through
<kubeletDir>/plugins_registry.
*/}}
{{- define "boxlite-csi.registrarContainer" -}}
{{- $healthHost := include "boxlite-csi.healthHost" . -}}
{{- with .Values.registrar -}}
- name: node-driver-registrar
  image: {{ include "boxlite-csi.image" .image }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --kubelet-registration-path={{ include "boxlite-csi.pluginDir" $ }}/csi.sock
    - --http-endpoint={{ $healthHost }}:{{ .livenessProbe.port }}
    - --v={{ $.Values.logVerbosity }}
  ports:
    - name: registrar-hz
      containerPort: {{ .livenessProbe.port }}
      protocol: TCP
  # Fails when kubelet no longer sees the registration socket (e.g. after
  # kubelet's plugins_registry was cleaned up). The restart registers again.
  livenessProbe:
    {{- include "boxlite-csi.healthzProbe" (dict "port" "registrar-hz" "host" $healthHost "timings" .livenessProbe) | nindent 4 }}
  securityContext:
    {{- include "boxlite-csi.sidecarSecurityContext" $ | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
    - name: registration-dir
      mountPath: /registration
{{- end -}}
{{- end -}}

{{/*
livenessprobe: calls the plugin's CSI Probe and serves the answer at
/healthz, for the plugin container's liveness and readiness probes.
*/}}
{{- define "boxlite-csi.livenessProbeContainer" -}}
{{- $healthHost := include "boxlite-csi.healthHost" . -}}
{{- with .Values.livenessProbe -}}
- name: liveness-probe
  image: {{ include "boxlite-csi.image" .image }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --http-endpoint={{ $healthHost }}:{{ .port }}
    - --probe-timeout=4s
    - --v={{ $.Values.logVerbosity }}
  securityContext:
    {{- include "boxlite-csi.sidecarSecurityContext" $ | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end -}}
{{- end -}}

{{/*
external-provisioner, one per node: creates and deletes the volumes of the
PVCs whose pods run on this node, and publishes the node's free space.
*/}}
{{- define "boxlite-csi.provisionerContainer" -}}
{{- with .Values.provisioner -}}
- name: csi-provisioner
  image: {{ include "boxlite-csi.image" .image }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $.Values.logVerbosity }}
    # One provisioner per node. Each creates volumes only for claims whose
    # pod the scheduler put on its own node (NODE_NAME).
    - --node-deployment=true
    # With Immediate binding every node would race for a claim after a
    # random delay, and the box would land on whichever node won. A box
    # has to be where its pod runs, so only WaitForFirstConsumer is used.
    - --node-deployment-immediate-binding=false
    # The topology passed to CreateVolume is just the selected node.
    - --strict-topology=true
    - --immediate-topology=false
    # Publish this node's free space (GetCapacity) as CSIStorageCapacity
    # objects for the scheduler.
    - --enable-capacity=true
    # The capacity objects are owned by this pod and garbage-collected
    # with it, so a node that leaves the cluster leaves no stale capacity
    # behind.
    - --capacity-ownerref-level=0
    - --capacity-poll-interval={{ .capacityPollInterval }}
    - --timeout={{ .timeout }}
    - --worker-threads={{ .workerThreads }}
    {{- range .extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
    # NAMESPACE is where the capacity objects live; with capacity on,
    # external-provisioner exits at start-up without it. POD_NAME is
    # their owner.
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
  securityContext:
    {{- include "boxlite-csi.sidecarSecurityContext" $ | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end -}}
{{- end -}}

{{/*
csi-snapshotter, one per node: takes the VolumeSnapshotContents that the
snapshot-controller (with --enable-distributed-snapshotting) labelled with
this node, and calls the plugin's CreateSnapshot and DeleteSnapshot for
them. A snapshot is a set of links in this node's home, so no other node's
sidecar could make it.
*/}}
{{- define "boxlite-csi.snapshotterContainer" -}}
{{- with .Values.snapshotter -}}
- name: csi-snapshotter
  image: {{ include "boxlite-csi.image" .image }}
  imagePullPolicy: {{ .image.pullPolicy }}
  args:
    - --csi-address=/csi/csi.sock
    - --v={{ $.Values.logVerbosity }}
    # Only the contents labelled snapshot.storage.kubernetes.io/managed-by
    # = NODE_NAME. There is no leader election (off by default in the
    # sidecar): every node has its own sidecar for its own volumes.
    - --node-deployment=true
    - --timeout={{ .timeout }}
    - --worker-threads={{ .workerThreads }}
    {{- range .extraArgs }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: NODE_NAME
      valueFrom:
        fieldRef:
          fieldPath: spec.nodeName
  securityContext:
    {{- include "boxlite-csi.sidecarSecurityContext" $ | nindent 4 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: socket-dir
      mountPath: /csi
{{- end -}}
{{- end -}}
