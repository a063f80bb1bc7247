{{/*
Release-scoped name for namespaced and cluster-scoped objects; 63 characters
is the label-value limit the name also ends up in.
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

{{/* The plugin socket directory on the host. */}}
{{- define "boxlite-csi.pluginDir" -}}
{{- printf "%s/plugins/%s" .Values.kubeletDir .Values.driverName -}}
{{- end -}}

{{/*
Host address the health endpoints bind to: the node's loopback when the pod
shares the node's network (nothing exposed off the node; kubelet probes
127.0.0.1), every address of the pod's own namespace otherwise.
*/}}
{{- define "boxlite-csi.healthHost" -}}
{{- if .Values.hostNetwork -}}127.0.0.1{{- end -}}
{{- end -}}

{{/*
GOMEMLIMIT in bytes: goMemLimitPercent of resources.limits.memory, or
nothing when either is unset. The schema limits the quantity to whole
numbers with a binary or decimal suffix, which is what integer arithmetic
here can do exactly.
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
Cross-field checks JSON Schema cannot express; included by the DaemonSet so
they run on every install, template and lint.
*/}}
{{- define "boxlite-csi.validate" -}}
{{- if ge (float64 .Values.cache.lowWatermark) (float64 .Values.cache.highWatermark) -}}
{{- fail (printf "cache.lowWatermark (%v) must be below cache.highWatermark (%v): eviction stops at the low watermark after starting above the high one" .Values.cache.lowWatermark .Values.cache.highWatermark) -}}
{{- end -}}
{{- if and .Values.storageClass.enabled .Values.storageClass.pullSecret.namespace (not .Values.storageClass.pullSecret.name) -}}
{{- fail "storageClass.pullSecret.namespace is set but storageClass.pullSecret.name is empty" -}}
{{- end -}}
{{- if and .Values.metrics.podMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.podMonitor.enabled needs metrics.enabled: the PodMonitor would scrape a port nothing serves" -}}
{{- end -}}
{{- end -}}

{{/*
Sidecars only talk to the plugin's socket (and the registrar writes its
socket into plugins_registry), all as the images' root user on root-owned
host directories: no capability or privilege is needed for that.
*/}}
{{- define "boxlite-csi.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
