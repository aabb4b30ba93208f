{{/* Names ---------------------------------------------------------------------------------------- */}}
{{- define "parley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley.fullname" -}}
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

{{/* The name of one service's objects: <fullname>-<service>. Call with (dict "root" $ "svc" "gateway"). */}}
{{- define "parley.svcname" -}}
{{- printf "%s-%s" (include "parley.fullname" .root) .svc | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "parley.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "parley.secretName" -}}
{{- default (include "parley.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* Labels --------------------------------------------------------------------------------------- */}}
{{- define "parley.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: parley
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .svc }}
{{- end -}}

{{- define "parley.svcLabels" -}}
{{ include "parley.labels" .root }}
app.kubernetes.io/component: {{ .svc }}
{{- end -}}

{{- define "parley.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* NATS ----------------------------------------------------------------------------------------- */}}
{{/* The NATS chart's full name (its nats.fullname helper), so the URL points at its client Service. */}}
{{- define "parley.natsFullname" -}}
{{- $n := .Values.nats -}}
{{- if $n.fullnameOverride -}}
{{- $n.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default "nats" $n.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "parley.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s.%s.svc:4222" (include "parley.natsFullname" .) .Release.Namespace -}}
{{- else -}}
{{- join "," .Values.externalNats.urls -}}
{{- end -}}
{{- end -}}

{{/* Number of NATS servers Parley talks to. */}}
{{- define "parley.natsServers" -}}
{{- if .Values.nats.enabled -}}
{{- if (dig "config" "cluster" "enabled" false .Values.nats) -}}
{{- dig "config" "cluster" "replicas" 3 .Values.nats | int -}}
{{- else -}}
1
{{- end -}}
{{- else -}}
{{- .Values.externalNats.clusterSize | int -}}
{{- end -}}
{{- end -}}

{{/* PARLEY_STREAM_REPLICAS: streamReplicas, or min(3, NATS servers); never more than the servers. */}}
{{- define "parley.streamReplicas" -}}
{{- $servers := include "parley.natsServers" . | int -}}
{{- $r := .Values.streamReplicas | int -}}
{{- if eq $r 0 -}}{{- $r = min 3 $servers -}}{{- end -}}
{{- if gt $r $servers -}}
{{- fail (printf "streamReplicas=%d exceeds the %d NATS server(s): JetStream cannot place the replicas" $r $servers) -}}
{{- end -}}
{{- $r -}}
{{- end -}}

{{/* Checks that a template can make and a schema cannot --------------------------------------------- */}}
{{- define "parley.validate" -}}
{{- $db := .Values.transcript.database.type -}}
{{- if and (eq $db "sqlite") (ne (int .Values.transcript.replicas) 1) -}}
{{- fail "transcript.database.type=sqlite is a single-replica demo store: set transcript.replicas=1 or use postgresql" -}}
{{- end -}}
{{- if and (eq $db "postgresql") (not .Values.secrets.existingSecret) (not .Values.secrets.transcriptDsn) -}}
{{- fail "transcript.database.type=postgresql needs secrets.transcriptDsn or secrets.existingSecret (with key PARLEY_TRANSCRIPT_DSN)" -}}
{{- end -}}
{{- if and (not .Values.nats.enabled) (not .Values.externalNats.urls) (not .Values.externalNats.urlFromSecret) -}}
{{- fail "nats.enabled=false needs externalNats.urls (or externalNats.urlFromSecret)" -}}
{{- end -}}
{{- if and .Values.externalNats.urlFromSecret (not .Values.secrets.existingSecret) (not .Values.secrets.natsUrl) -}}
{{- fail "externalNats.urlFromSecret needs secrets.natsUrl or secrets.existingSecret (with key PARLEY_NATS_URL)" -}}
{{- end -}}
{{- if gt (int .Values.config.dedupeWindowS) (int .Values.config.streamMaxAgeS) -}}
{{- fail "config.dedupeWindowS may not exceed config.streamMaxAgeS" -}}
{{- end -}}
{{- $drain := add (int .Values.gateway.preStopSleepSeconds) 15 -}}
{{- if lt (int .Values.gateway.terminationGracePeriodSeconds) $drain -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds must be >= preStopSleepSeconds + 15 (the gateway drains for up to 10 s, then shuts down): %d < %d" (int .Values.gateway.terminationGracePeriodSeconds) $drain) -}}
{{- end -}}
{{- with .Values.gateway.autoscaling -}}
{{- if and .enabled (gt (int .minReplicas) (int .maxReplicas)) -}}
{{- fail "gateway.autoscaling.minReplicas may not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.otel.enabled (not .Values.otel.endpoint) -}}
{{- fail "otel.enabled needs otel.endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)" -}}
{{- end -}}
{{- end -}}

{{- define "parley.otelResourceAttributes" -}}
{{- $attrs := list "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" -}}
{{- range $k, $v := .Values.otel.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end -}}

{{/* Port of the OTLP endpoint (4318, OTLP/HTTP, when the URL names none). */}}
{{- define "parley.otelPort" -}}
{{- $u := urlParse .Values.otel.endpoint -}}
{{- $hostport := splitList ":" $u.host -}}
{{- if gt (len $hostport) 1 -}}{{ last $hostport }}{{- else if eq $u.scheme "https" -}}443{{- else -}}4318{{- end -}}
{{- end -}}
