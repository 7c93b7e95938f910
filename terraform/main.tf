# dicom-deid on GCP: three CMEK-encrypted buckets (input, public output, private), a temp bucket,
# a least-privilege worker service account, the key in Secret Manager, the Flex Template job and
# a nightly incremental run from Cloud Scheduler.

data "google_project" "this" {}

data "google_storage_project_service_account" "gcs" {}

locals {
  buckets = {
    input   = "${var.name}-input"
    output  = "${var.name}-output"
    private = "${var.name}-private"
    temp    = "${var.name}-temp"
  }
  # one entry per template parameter (templates/metadata.json) and `dicom-deid run` option
  pipeline_parameters = {
    input           = var.input != "" ? var.input : "gs://${google_storage_bucket.this["input"].name}/**"
    output          = var.output != "" ? var.output : "gs://${google_storage_bucket.this["output"].name}/deid"
    private         = var.private != "" ? var.private : "gs://${google_storage_bucket.this["private"].name}/deid"
    policy          = var.policy
    key             = var.key != "" ? var.key : "gcpsm://${google_secret_manager_secret.key.id}/versions/latest"
    strict          = tostring(var.strict)
    max_input_bytes = var.max_input_bytes
    lookup_table    = var.lookup_table
    exclusions      = var.exclusions
    incremental     = tostring(var.incremental)
    pseudonym_map   = var.pseudonym_map
  }
  parameters = { for k, v in local.pipeline_parameters : k => v if v != "" }
  environment = {
    serviceAccountEmail   = google_service_account.worker.email
    tempLocation          = "gs://${google_storage_bucket.this["temp"].name}/tmp"
    stagingLocation       = "gs://${google_storage_bucket.this["temp"].name}/staging"
    kmsKeyName            = google_kms_crypto_key.data.id
    maxWorkers            = var.max_workers
    machineType           = var.machine_type
    sdkContainerImage     = var.template_image
    ipConfiguration       = "WORKER_IP_PRIVATE"
    additionalExperiments = ["use_runner_v2"]
  }
}

# --- encryption -----------------------------------------------------------------------------

resource "google_kms_key_ring" "this" {
  name     = var.name
  location = var.region
}

resource "google_kms_crypto_key" "data" {
  name            = "${var.name}-data"
  key_ring        = google_kms_key_ring.this.id
  rotation_period = var.kms_rotation_period
  lifecycle {
    prevent_destroy = true
  }
}

# the service agents that encrypt on our behalf: Cloud Storage, Dataflow, Compute (job state)
resource "google_kms_crypto_key_iam_member" "agents" {
  for_each = toset([
    "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}",
    "serviceAccount:service-${data.google_project.this.number}@dataflow-service-producer-prod.iam.gserviceaccount.com",
    "serviceAccount:service-${data.google_project.this.number}@compute-system.iam.gserviceaccount.com",
  ])
  crypto_key_id = google_kms_crypto_key.data.id
  role          = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
  member        = each.value
}

# --- buckets --------------------------------------------------------------------------------

resource "google_storage_bucket" "this" {
  for_each                    = local.buckets
  name                        = each.value
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  encryption {
    default_kms_key_name = google_kms_crypto_key.data.id
  }

  dynamic "retention_policy" {
    for_each = each.key == "private" ? [1] : []
    content {
      retention_period = var.private_retention_days * 86400
    }
  }

  dynamic "lifecycle_rule" {
    for_each = each.key == "private" ? [] : [1]
    content {
      condition {
        days_since_noncurrent_time = var.noncurrent_version_days
      }
      action {
        type = "Delete"
      }
    }
  }

  depends_on = [google_kms_crypto_key_iam_member.agents]
}

# --- identities (least privilege) -----------------------------------------------------------

resource "google_service_account" "worker" {
  account_id   = "${var.name}-worker"
  display_name = "dicom-deid Dataflow workers"
}

resource "google_service_account" "scheduler" {
  account_id   = "${var.name}-scheduler"
  display_name = "dicom-deid nightly launcher"
}

resource "google_project_iam_member" "worker_dataflow" {
  project = var.project
  role    = "roles/dataflow.worker"
  member  = "serviceAccount:${google_service_account.worker.email}"
}

# read the inputs; write (and, for staging and idempotent re-runs, read and delete) the outputs
resource "google_storage_bucket_iam_member" "worker" {
  for_each = {
    input   = "roles/storage.objectViewer"
    output  = "roles/storage.objectUser"
    private = "roles/storage.objectUser"
    temp    = "roles/storage.objectUser"
  }
  bucket = google_storage_bucket.this[each.key].name
  role   = each.value
  member = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_secret_manager_secret_iam_member" "worker" {
  secret_id = google_secret_manager_secret.key.id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.worker.email}"
}

resource "google_project_iam_member" "scheduler_dataflow" {
  project = var.project
  role    = "roles/dataflow.developer"
  member  = "serviceAccount:${google_service_account.scheduler.email}"
}

resource "google_service_account_iam_member" "scheduler_acts_as_worker" {
  service_account_id = google_service_account.worker.name
  role               = "roles/iam.serviceAccountUser"
  member             = "serviceAccount:${google_service_account.scheduler.email}"
}

# --- the pseudonymisation key ---------------------------------------------------------------
# Only the secret is declared here; add its value out of band so it never enters Terraform
# state:  head -c 32 /dev/urandom | xxd -p -c 64 | gcloud secrets versions add SECRET --data-file=-

resource "google_secret_manager_secret" "key" {
  secret_id = "${var.name}-key"
  replication {
    user_managed {
      replicas {
        location = var.region
        customer_managed_encryption {
          kms_key_name = google_kms_crypto_key.data.id
        }
      }
    }
  }
  depends_on = [google_kms_crypto_key_iam_member.agents]
}

# --- jobs -----------------------------------------------------------------------------------

resource "google_dataflow_flex_template_job" "backfill" {
  count                   = var.run_backfill ? 1 : 0
  provider                = google
  name                    = "${var.name}-backfill"
  region                  = var.region
  container_spec_gcs_path = var.template_spec_path
  parameters              = local.parameters
  service_account_email   = google_service_account.worker.email
  temp_location           = local.environment.tempLocation
  staging_location        = local.environment.stagingLocation
  kms_key_name            = google_kms_crypto_key.data.id
  max_workers             = var.max_workers
  machine_type            = var.machine_type
  sdk_container_image     = var.template_image
  ip_configuration        = local.environment.ipConfiguration
  on_delete               = "cancel"
}

resource "google_cloud_scheduler_job" "nightly" {
  name      = "${var.name}-nightly"
  region    = var.region
  schedule  = var.schedule
  time_zone = var.time_zone

  http_target {
    http_method = "POST"
    uri         = "https://dataflow.googleapis.com/v1b3/projects/${var.project}/locations/${var.region}/flexTemplates:launch"
    body = base64encode(jsonencode({
      launchParameter = {
        jobName              = "${var.name}-nightly"
        containerSpecGcsPath = var.template_spec_path
        parameters           = merge(local.parameters, { incremental = "true" })
        environment          = local.environment
      }
    }))
    headers = { "Content-Type" = "application/json" }
    oauth_token {
      service_account_email = google_service_account.scheduler.email
    }
  }
}
