{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "dovecote.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified name: the release name, or release-chart when they differ. */}}
{{- define "dovecote.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the pods: Service, PDB, anti-affinity and ServiceMonitor use them. */}}
{{- define "dovecote.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dovecote.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "dovecote.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "dovecote.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: relay
app.kubernetes.io/part-of: dovecote
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Secret the pods read: existingSecret, or the one named like the release. */}}
{{- define "dovecote.secretName" -}}
{{- default (include "dovecote.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{/* "true" when the chart itself creates the Secret. */}}
{{- define "dovecote.createSecret" -}}
{{- if and (not .Values.existingSecret) (or .Values.store.url .Values.adminToken .Values.identity) -}}
true
{{- end -}}
{{- end -}}

{{/* Fail early on settings that would lose or split data, or cut the drain short. */}}
{{- define "dovecote.validate" -}}
{{- if not (has .Values.store.type (list "postgresql" "sqlite")) -}}
{{- fail (printf "store.type must be postgresql or sqlite, not %q" .Values.store.type) -}}
{{- end -}}
{{- if eq .Values.store.type "sqlite" -}}
{{- if or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled -}}
{{- fail "more than one instance needs PostgreSQL: with store.type=sqlite set replicaCount=1 and autoscaling.enabled=false" -}}
{{- end -}}
{{- if .Values.store.url -}}
{{- fail "store.url is for store.type=postgresql" -}}
{{- end -}}
{{- end -}}
{{- if and (include "dovecote.createSecret" .) (eq .Values.store.type "postgresql") (not (and .Values.store.url .Values.identity)) -}}
{{- fail "with store.type=postgresql the chart-created Secret needs both store.url and identity (or use existingSecret)" -}}
{{- end -}}
{{- if and .Values.store.url (not (hasPrefix "postgresql://" .Values.store.url)) (not (hasPrefix "postgres://" .Values.store.url)) -}}
{{- fail "store.url must be a postgresql:// URL" -}}
{{- end -}}
{{- if not (or .Values.config.publicUrl .Values.ingress.enabled) -}}
{{- fail "set config.publicUrl (DOVECOTE_PUBLIC_URL) to the URL clients use, e.g. https://relay.example.com, or enable the Ingress: the mediator's DID embeds it, and Dovecote refuses to advertise 0.0.0.0" -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add (int .Values.preStopSleepSeconds) (int .Values.config.shutdownTimeout)) -}}
{{- fail "terminationGracePeriodSeconds must exceed preStopSleepSeconds + config.shutdownTimeout, or Kubernetes kills the pod mid-drain" -}}
{{- end -}}
{{- end -}}
