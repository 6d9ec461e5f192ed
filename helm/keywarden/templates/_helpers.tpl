{{/* Chart name, truncated to fit label limits. */}}
{{- define "keywarden.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keywarden.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keywarden.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keywarden.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keywarden.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "keywarden.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "keywarden.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keywarden.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "keywarden.secretName" -}}
{{- default (include "keywarden.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "keywarden.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Pod and container security: non-root, read-only root, no privileges. */}}
{{- define "keywarden.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "keywarden.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The database URL, from the chart's Secret or an existing one. */}}
{{- define "keywarden.databaseUrlEnv" -}}
- name: KEYWARDEN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "keywarden.secretName" . }}
      key: database-url
{{- end }}

{{/* OTEL_RESOURCE_ATTRIBUTES from a map: k1=v1,k2=v2 in key order. */}}
{{- define "keywarden.resourceAttributes" -}}
{{- $pairs := list }}
{{- range $k := keys .resourceAttributes | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $k (get $.resourceAttributes $k)) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* Whether the gRPC ports serve TLS. */}}
{{- define "keywarden.tls" -}}
{{- if or .Values.tls.existingSecret .Values.tls.certManager.enabled }}true{{ end -}}
{{- end }}

{{/* The Secret holding tls.crt and tls.key. */}}
{{- define "keywarden.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "keywarden.fullname" .)) .Values.tls.existingSecret -}}
{{- end }}

{{/* Refuses combinations that would not start or would not be safe. */}}
{{- define "keywarden.checkTransport" -}}
{{- if and (not (include "keywarden.tls" .)) (not .Values.allowPlaintext) }}
{{- fail "no TLS material: set tls.existingSecret (a kubernetes.io/tls Secret), or tls.certManager.enabled with tls.certManager.issuerRef (renders a cert-manager Certificate), or allowPlaintext=true only behind a mesh whose sidecars terminate mTLS" }}
{{- end }}
{{- if and .Values.tls.clientCa.existingSecret (not (include "keywarden.tls" .)) }}
{{- fail "tls.clientCa needs a server certificate: tls.existingSecret or tls.certManager" }}
{{- end }}
{{- if and (or .Values.tls.verifyCallers .Values.tls.outcomeReporters .Values.operatorIdentities) (not .Values.tls.clientCa.existingSecret) }}
{{- fail "tls.verifyCallers, tls.outcomeReporters and operatorIdentities are certificate identities: they need tls.clientCa (mTLS)" }}
{{- end }}
{{- if and .Values.tls.clientCrl.existingSecret (not .Values.tls.clientCa.existingSecret) }}
{{- fail "tls.clientCrl revokes client certificates: it needs tls.clientCa (mTLS)" }}
{{- end }}
{{- if and (include "keywarden.tls" .) (eq (int .Values.service.healthPort) 0) }}
{{- fail "with TLS, service.healthPort is required: the kubelet's gRPC probes cannot speak TLS" }}
{{- end }}
{{- if and .Values.tls.certManager.enabled (not .Values.tls.certManager.issuerRef.name) }}
{{- fail "tls.certManager.issuerRef.name is required" }}
{{- end }}
{{- end }}

{{/* operatorIdentities as the TOML inline array KEYWARDEN_OPERATOR_IDENTITIES takes. */}}
{{- define "keywarden.operatorIdentities" -}}
[{{- range $i, $g := .Values.operatorIdentities -}}
{{- if $i }}, {{ end -}}
{identity = {{ $g.identity | quote }}, role = {{ $g.role | quote }}, merchant_ids = [{{ range $j, $m := $g.merchantIds }}{{ if $j }}, {{ end }}{{ $m | quote }}{{ end }}]}
{{- end -}}]
{{- end }}

{{/* The ConfigMap holding the gateway's routes.toml, if any. */}}
{{- define "keywarden.routesConfigMap" -}}
{{- if .Values.gateway.existingConfigMap -}}
{{ .Values.gateway.existingConfigMap }}
{{- else if .Values.gateway.routes -}}
{{ include "keywarden.fullname" . }}-routes
{{- end -}}
{{- end }}
