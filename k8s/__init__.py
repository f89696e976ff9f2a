"""cnnbatch's Kubernetes manifests and their offline validator, k8s.validate."""
