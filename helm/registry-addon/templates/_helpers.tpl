{{/* Fixed object names: the ExtensionConfig and RBAC are cluster-wide, one per management cluster. */}}
{{- define "registry-addon.name" -}}registry-addon{{- end }}
{{- define "registry-addon.tlsSecret" -}}registry-addon-webhook-tls{{- end }}
{{- define "registry-addon.webhookService" -}}registry-addon-webhook{{- end }}

{{- define "registry-addon.labels" -}}
app.kubernetes.io/name: registry-addon
app.kubernetes.io/part-of: registry-addon
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "registry-addon.selectorLabels" -}}
app.kubernetes.io/name: registry-addon
app.kubernetes.io/component: runtime-extension
{{- end }}

{{- define "registry-addon.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
