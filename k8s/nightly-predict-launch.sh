#!/bin/sh
# Launcher of the nightly bulk predict, run by the CronJob cnnbatch-nightly-predict.
#
# Creates the night's RayJob from nightly-predict-rayjob.yaml and waits until KubeRay reports it finished,
# so that the CronJob's concurrencyPolicy: Forbid spans the whole run and the Job's status is the run's.
# Needs kubectl, sed and date, and only create/get on rayjobs.ray.io (nightly-predict-rbac.yaml).
set -eu

template=${TEMPLATE:-/etc/cnnbatch-nightly/rayjob.yaml}
poll_seconds=${POLL_SECONDS:-30}
# How long past the RayJob's own activeDeadlineSeconds to wait for KubeRay to report the end.
grace_seconds=900

: "${CNNBATCH_IMAGE:?}" "${LAUNCHER_JOB_NAME:?}" "${LAUNCHER_JOB_UID:?}"

name=$(sed -e "s|__CNNBATCH_IMAGE__|${CNNBATCH_IMAGE}|g" \
           -e "s|__LAUNCHER_JOB_NAME__|${LAUNCHER_JOB_NAME}|g" \
           -e "s|__LAUNCHER_JOB_UID__|${LAUNCHER_JOB_UID}|g" "$template" |
       kubectl create -f - -o name)
echo "created ${name}"

deadline=$(kubectl get "$name" -o jsonpath='{.spec.activeDeadlineSeconds}') || deadline=""
give_up=$(($(date +%s) + ${deadline:-86400} + grace_seconds))

while :; do
  # A failed poll (an API server hiccup) is retried; only a final state or the deadline ends the wait.
  status=$(kubectl get "$name" -o jsonpath='{.status.jobDeploymentStatus}') || status=unknown
  case "$status" in
    Complete)
      echo "${name}: Complete"
      exit 0
      ;;
    Failed | ValidationFailed)
      kubectl get "$name" -o jsonpath='{.status.reason}{": "}{.status.message}{"\n"}' >&2 || true
      echo "${name}: ${status}" >&2
      exit 1
      ;;
  esac
  if [ "$(date +%s)" -ge "$give_up" ]; then
    echo "${name}: still '${status}' past its deadline; is the KubeRay operator running?" >&2
    exit 1
  fi
  sleep "$poll_seconds"
done
