//! A fake Kubernetes API server speaking the real list/watch protocol (to be written).
