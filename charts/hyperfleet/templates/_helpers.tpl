{{/* Names, labels and small shared snippets. */}}

{{- define "hyperfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release-scoped base name; "hyperfleet" for a release called hyperfleet. */}}
{{- define "hyperfleet.fullname" -}}
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

{{- define "hyperfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "hyperfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hyperfleet
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "controller"). */}}
{{- define "hyperfleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hyperfleet.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "hyperfleet.controller.serviceAccountName" -}}
{{- default (printf "%s-controller" (include "hyperfleet.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- end -}}

{{- define "hyperfleet.agent.serviceAccountName" -}}
{{- default (printf "%s-agent" (include "hyperfleet.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- end -}}

{{/* repository@digest when image.digest is set (a pinned image), else repository:tag. */}}
{{- define "hyperfleet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Whether anything off the node can scrape the agents (not bound to loopback). */}}
{{- define "hyperfleet.agent.metricsExposed" -}}
{{- if and .Values.metrics.enabled (not (has .Values.metrics.agent.bindAddress (list "127.0.0.1" "localhost" "::1"))) -}}true{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget for the controller: with peering (a second replica to fail over
     to), unless only the active replica is Ready (webhook on): then no budget could ever
     allow evicting it and every drain of its node would block. */}}
{{- define "hyperfleet.controller.pdb" -}}
{{- $webhook := and .Values.gitops.enabled .Values.gitops.webhook.enabled -}}
{{- if and .Values.controller.podDisruptionBudget.enabled (include "hyperfleet.controller.peering" .) (not $webhook) (gt (int .Values.controller.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* kopf peering (one active controller replica) is required as soon as there are two. */}}
{{- define "hyperfleet.controller.peering" -}}
{{- if or .Values.controller.peering.enabled (gt (int .Values.controller.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{- define "hyperfleet.webhook.secretName" -}}
{{- default (printf "%s-webhook" (include "hyperfleet.fullname" .)) .Values.gitops.webhook.existingSecret -}}
{{- end -}}

{{/* The namespaces whose Secrets the GitSource reconciler may read. */}}
{{- define "hyperfleet.gitops.secretNamespaces" -}}
{{- $out := list .Release.Namespace -}}
{{- if and .Values.gitSource.enabled .Values.gitSource.namespace -}}
{{- $out = append $out .Values.gitSource.namespace -}}
{{- end -}}
{{- range .Values.gitops.secretNamespaces -}}
{{- $out = append $out . -}}
{{- end -}}
{{- $out | uniq | join "," -}}
{{- end -}}

{{/* The agents' --fence-after: half the eviction timeout unless set; it must stay below
     it, or a partitioned node could still run VMs the controller has moved elsewhere. */}}
{{- define "hyperfleet.fenceAfter" -}}
{{- $eviction := .Values.controller.evictionTimeoutSeconds -}}
{{- $fence := .Values.agent.fenceAfterSeconds -}}
{{- if kindIs "invalid" $fence -}}
{{- $fence = divf $eviction 2 -}}
{{- end -}}
{{- if ge (float64 $fence) (float64 $eviction) -}}
{{- fail (printf "agent.fenceAfterSeconds (%v) must be below controller.evictionTimeoutSeconds (%v): a partitioned node would run its VMs after they were placed elsewhere; lower it, or use 0 to turn fencing off" $fence $eviction) -}}
{{- end -}}
{{- $fence -}}
{{- end -}}
