{{/* Labels of every object. */}}
{{- define "registry.labels" -}}
app.kubernetes.io/name: registry
app.kubernetes.io/part-of: registry-addon
app.kubernetes.io/component: registry
{{- end }}

{{/* Labels selecting the registry pods. */}}
{{- define "registry.selectorLabels" -}}
app.kubernetes.io/name: registry
app.kubernetes.io/part-of: registry-addon
{{- end }}

{{/* The server certificate names registry-system; another namespace would not match it. */}}
{{- define "registry.namespace" -}}
{{- if ne .Release.Namespace "registry-system" }}
{{- fail (printf "the registry chart must be installed in namespace registry-system, not %s: its TLS certificate names that namespace" .Release.Namespace) }}
{{- end }}
{{- .Release.Namespace }}
{{- end }}

{{/* A container's resources without empty maps. */}}
{{- define "registry.resources" -}}
{{- with .requests }}
requests:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .limits }}
limits:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Labels of the node agent's objects. */}}
{{- define "registry.nodeAgentLabels" -}}
app.kubernetes.io/name: registry-node-agent
app.kubernetes.io/part-of: registry-addon
app.kubernetes.io/component: node-agent
{{- end }}

{{/* Labels selecting the node agent's pods. */}}
{{- define "registry.nodeAgentSelectorLabels" -}}
app.kubernetes.io/name: registry-node-agent
app.kubernetes.io/part-of: registry-addon
{{- end }}

{{/* Labels the Service selects: the serving pods of every mode (StatefulSet and Direct). */}}
{{- define "registry.servingLabels" -}}
app.kubernetes.io/part-of: registry-addon
app.kubernetes.io/component: registry
{{- end }}

{{/* Labels of Direct's objects. */}}
{{- define "registry.directLabels" -}}
app.kubernetes.io/name: registry-direct
app.kubernetes.io/part-of: registry-addon
app.kubernetes.io/component: registry
{{- end }}

{{/* Labels selecting Direct's pods; the StatefulSet's selector does not match them. */}}
{{- define "registry.directSelectorLabels" -}}
app.kubernetes.io/name: registry-direct
app.kubernetes.io/part-of: registry-addon
{{- end }}

{{/* The workload objects of a mode. A change of mode drops some from the release: Helm leaves
them, and the addon deletes them once the switch is complete, so that the previous mode keeps
serving at the address beside the new one until then. */}}
{{- define "registry.keep" -}}
helm.sh/resource-policy: keep
{{- end }}
