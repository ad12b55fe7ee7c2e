{{/*
Names, labels and the pieces every pod shares (image, hardened security contexts, the config volume).
Nothing here renders an object by itself.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "llamesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name: fullnameOverride, RELEASE when it contains the chart's name, else
RELEASE-NAME. Trimmed so that the longest suffix used here ("-operator-framework") still fits 63 characters. */}}
{{- define "llamesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 44 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 44 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 44 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; pass (dict "root" $ "component" "operator|agent|gateway|...") */}}
{{- define "llamesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llamesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: llamesh
{{- end -}}

{{/* The labels a role's pods are selected by (Deployments, the Service, NetworkPolicy, PDBs). */}}
{{- define "llamesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llamesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The ServiceAccount name of a role; pass (dict "root" $ "component" "operator|agent|gateway"). */}}
{{- define "llamesh.serviceAccountName" -}}
{{- $account := (index .root.Values .component).serviceAccount -}}
{{- if $account.create -}}
{{- default (printf "%s-%s" (include "llamesh.fullname" .root) .component) $account.name -}}
{{- else -}}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) $account.name -}}
{{- end -}}
{{- end -}}

{{/* The image of every role. */}}
{{- define "llamesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Pod-level security context: non-root, seccomp RuntimeDefault. */}}
{{- define "llamesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security context: read-only root filesystem, no capabilities, no privilege escalation. */}}
{{- define "llamesh.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
{{- end -}}

{{/* Where config.yaml is mounted (a folder: ConfigMap updates reach it, unlike a subPath mount). */}}
{{- define "llamesh.configDir" -}}/etc/llamesh{{- end -}}

{{/* Where the gateway's secrets.yaml is mounted (outside configDir: that folder is a read-only volume). */}}
{{- define "llamesh.secretsDir" -}}/etc/llamesh-secrets{{- end -}}

{{/* The agent's llama.cpp cache inside its container (config.yaml's llama_cpp.cache_dir). */}}
{{- define "llamesh.llamaCppCacheDir" -}}/var/cache/llamesh/llama.cpp{{- end -}}

{{/* Where the agent (and the llama-server instances in its pod) keep saved slot KV caches: config.yaml's
kv_cache.directory, the mount path of agent.cache.kvCache. */}}
{{- define "llamesh.kvCacheDir" -}}/var/cache/llamesh/kv-cache{{- end -}}

{{/* Environment every role gets: HOME on the writable /tmp (the root filesystem is read-only, and pip, git
and ccache write under ~), Python without bytecode writes. */}}
{{- define "llamesh.commonEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* The config volume mount and the /tmp scratch mount every role has. */}}
{{- define "llamesh.commonVolumeMounts" -}}
- name: config
  mountPath: {{ include "llamesh.configDir" . }}
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The config and /tmp volumes every role has. */}}
{{- define "llamesh.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "llamesh.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end -}}

{{/* A cache volume of the agent; pass (dict "name" NAME "cache" .Values.agent.cache.X). */}}
{{- define "llamesh.cacheVolume" -}}
- name: {{ .name }}
{{- if eq .cache.type "hostPath" }}
  hostPath:
    path: {{ required (printf "agent.cache: hostPath is required for the %s cache (type hostPath)" .name) .cache.hostPath }}
    type: DirectoryOrCreate
{{- else if eq .cache.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ required (printf "agent.cache: claimName is required for the %s cache (type persistentVolumeClaim)" .name) .cache.claimName }}
{{- else }}
  emptyDir: {{ if .cache.sizeLimit }}{sizeLimit: {{ .cache.sizeLimit | quote }}}{{ else }}{}{{ end }}
{{- end }}
{{- end -}}

{{/* The Secret holding the gateway's secrets.yaml, and the key inside it. */}}
{{- define "llamesh.authSecretName" -}}
{{- default (printf "%s-auth" (include "llamesh.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}
{{- define "llamesh.authSecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}secrets.yaml{{- end -}}
{{- end -}}
