# --- where ----------------------------------------------------------------------------------

variable "project" {
  description = "GCP project that holds the buckets, key, secret and jobs."
  type        = string
}

variable "region" {
  description = "Region of the buckets, the KMS key ring, the Dataflow jobs and the scheduler (e.g. europe-west2)."
  type        = string
}

variable "name" {
  description = "Prefix of every resource name (bucket names are global: make it unique)."
  type        = string
  default     = "dicom-deid"
}

variable "template_image" {
  description = "The Flex Template image built by templates/build.sh, by digest (REGION-docker.pkg.dev/PROJECT/REPO/dicom-deid@sha256:...)."
  type        = string
}

variable "template_spec_path" {
  description = "gs:// path of the template spec written by templates/build.sh (gcloud dataflow flex-template build)."
  type        = string
}

# --- buckets --------------------------------------------------------------------------------

variable "private_retention_days" {
  description = "Retention period of the private bucket (linkage table, dead letters, pseudonym store): objects cannot be deleted or replaced before it ends."
  type        = number
  default     = 3650
}

variable "noncurrent_version_days" {
  description = "Days after which non-current object versions in the input, output and temp buckets are deleted."
  type        = number
  default     = 30
}

variable "kms_rotation_period" {
  description = "Rotation period of the CMEK key that encrypts every bucket and the jobs' state."
  type        = string
  default     = "7776000s"
}

# --- the job --------------------------------------------------------------------------------

variable "max_workers" {
  description = "Largest number of Dataflow workers (see the sizing guide in docs/running-at-scale.md)."
  type        = number
  default     = 20
}

variable "machine_type" {
  description = "Dataflow worker machine type."
  type        = string
  default     = "n2-standard-4"
}

variable "schedule" {
  description = "Cron schedule of the nightly incremental run (Cloud Scheduler syntax)."
  type        = string
  default     = "0 1 * * *"
}

variable "time_zone" {
  description = "Time zone of the schedule."
  type        = string
  default     = "Europe/London"
}

variable "run_backfill" {
  description = "true: also start one (non-incremental) backfill job now with these parameters."
  type        = bool
  default     = false
}

# --- pipeline parameters: the same names as templates/metadata.json and `dicom-deid run` -------

variable "input" {
  description = "Comma-separated gs:// file patterns of the inputs; empty: every object in the managed input bucket."
  type        = string
  default     = ""
}

variable "output" {
  description = "gs:// public prefix for de-identified objects, manifest and summaries; empty: the managed output bucket."
  type        = string
  default     = ""
}

variable "private" {
  description = "gs:// private prefix for linkage, dead letters and the pseudonym store; empty: the managed private bucket."
  type        = string
  default     = ""
}

variable "policy" {
  description = "Built-in policy name (basic, research) or a gs:// policy file."
  type        = string
  default     = "basic"
}

variable "key" {
  description = "Key reference (gcpsm://projects/P/secrets/S/versions/V); empty: the latest version of the managed secret. Its value is added out of band (see docs/running-at-scale.md), never through Terraform state."
  type        = string
  default     = ""
}

variable "strict" {
  description = "true: refuse to run when the policy names options this version cannot apply."
  type        = bool
  default     = true
}

variable "max_input_bytes" {
  description = "Inputs larger than this become dead letters; empty: the pipeline's default (8 GiB)."
  type        = string
  default     = ""
}

variable "lookup_table" {
  description = "gs:// CSV/Parquet of research IDs in the private bucket; empty: none."
  type        = string
  default     = ""
}

variable "exclusions" {
  description = "gs:// CSV/Parquet of opt-outs in the private bucket; empty: none."
  type        = string
  default     = ""
}

variable "incremental" {
  description = "Incremental mode for the backfill job (the nightly scheduled run is always incremental)."
  type        = bool
  default     = false
}

variable "pseudonym_map" {
  description = "auto (plain HMAC runs skip the header scan; runs on one private prefix then queue) or scan (header scan first; the store lock is held only for it, so runs overlap)."
  type        = string
  default     = "auto"
  validation {
    condition     = contains(["auto", "scan"], var.pseudonym_map)
    error_message = "pseudonym_map must be auto or scan."
  }
}
