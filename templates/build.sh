#!/usr/bin/env bash
# Build and push the Flex Template image and write its spec to Cloud Storage.
# Usage: templates/build.sh IMAGE TEMPLATE_GCS_PATH LAUNCHER_IMAGE_DIGEST_REF
#   IMAGE                     e.g. europe-west2-docker.pkg.dev/my-project/dicom-deid/dicom-deid:0.1.0
#   TEMPLATE_GCS_PATH         e.g. gs://my-project-dicom-deid-templates/dicom-deid.json
#   LAUNCHER_IMAGE_DIGEST_REF gcr.io/dataflow-templates-base/python311-template-launcher-base@sha256:...
# Needs docker and gcloud (not used by the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE="$1"; TEMPLATE="$2"; LAUNCHER="$3"
docker build -f templates/Dockerfile --build-arg "LAUNCHER_IMAGE=$LAUNCHER" -t "$IMAGE" .
docker push "$IMAGE"
gcloud dataflow flex-template build "$TEMPLATE" --image "$IMAGE" --sdk-language PYTHON \
  --metadata-file templates/metadata.json
