{{/*
The release's name for the chart's objects, namespaced and cluster-scoped
alike. It is cut to 63 characters, because it also ends up in a label value.
*/}}
{{- define "boxlite-csi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "boxlite-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "boxlite-csi.labels" -}}
{{ include "boxlite-csi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "boxlite-csi.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* The directory on the host that holds the plugin's socket. */}}
{{- define "boxlite-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" .Values.kubeletDir .Values.driverName -}}
{{- end -}}

{{/*
The address the health endpoints listen on. When the pod shares the node's
network this is 127.0.0.1, so the endpoints are not exposed outside the node
(kubelet probes 127.0.0.1). Otherwise it is empty: every address in the
pod's own network namespace.
*/}}
{{- define "boxlite-csi.healthHost" -}}
{{- if .Values.hostNetwork -}}127.0.0.1{{- end -}}
{{- end -}}

{{/*
GOMEMLIMIT in bytes: goMemLimitPercent of resources.limits.memory. Empty
when either is unset. The schema allows only whole numbers with a binary or
decimal suffix for the limit, because integer arithmetic here computes
exactly those.
*/}}
{{- define "boxlite-csi.goMemLimit" -}}
{{- $limit := "" -}}
{{- with .Values.resources.limits -}}{{- with .memory -}}{{- $limit = toString . -}}{{- end -}}{{- end -}}
{{- if and $limit (gt (int .Values.goMemLimitPercent) 0) -}}
{{- $digits := regexFind "^[0-9]+" $limit -}}
{{- $unit := trimPrefix $digits $limit -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- if or (not $digits) (not (hasKey $units $unit)) -}}
{{- fail (printf "resources.limits.memory %q: GOMEMLIMIT needs a whole number with an optional Ki/Mi/Gi/Ti or k/M/G/T suffix" $limit) -}}
{{- end -}}
{{- div (mul (int64 $digits) (int64 (get $units $unit)) (int64 .Values.goMemLimitPercent)) 100 -}}
{{- end -}}
{{- end -}}

{{/*
Checks that involve more than one value, which JSON Schema cannot express.
The DaemonSet includes them, so they run on every install, template and lint.
*/}}
{{- define "boxlite-csi.validate" -}}
{{- if ge (float64 .Values.cache.lowWatermark) (float64 .Values.cache.highWatermark) -}}
{{- fail (printf "cache.lowWatermark (%v) must be below cache.highWatermark (%v): eviction stops at the low watermark after starting above the high one" .Values.cache.lowWatermark .Values.cache.highWatermark) -}}
{{- end -}}
{{- if and .Values.storageClass.enabled .Values.storageClass.pullSecret.namespace (not .Values.storageClass.pullSecret.name) -}}
{{- fail "storageClass.pullSecret.namespace is set but storageClass.pullSecret.name is empty" -}}
{{- end -}}
{{- if and .Values.snapshotClass.create (not .Values.snapshotter.enabled) -}}
{{- fail "snapshotClass.create needs snapshotter.enabled: without the csi-snapshotter sidecar no VolumeSnapshot of this class would ever be made" -}}
{{- end -}}
{{- if and .Values.metrics.podMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.podMonitor.enabled needs metrics.enabled: the PodMonitor would scrape a port nothing serves" -}}
{{- end -}}
{{- end -}}

{{/*
The security context of every sidecar. A sidecar only talks to the plugin's
socket (and the registrar puts its own socket in plugins_registry). It does
so as the image's root user in root-owned host directories, which needs no
capability and no privilege.
*/}}
{{- define "boxlite-csi.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
