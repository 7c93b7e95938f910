output "buckets" {
  description = "The managed buckets (input, output, private, temp)."
  value       = { for k, b in google_storage_bucket.this : k => b.url }
}

output "key_secret" {
  description = "The Secret Manager secret that holds the pseudonymisation key (add its value out of band)."
  value       = google_secret_manager_secret.key.id
}

output "worker_service_account" {
  description = "The workers' service account."
  value       = google_service_account.worker.email
}

output "pipeline_parameters" {
  description = "The template parameters the jobs are launched with."
  value       = local.parameters
}
