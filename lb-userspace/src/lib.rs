//! The lb-agent: Kubernetes objects in, BPF map writes out.
//!
//! Data flows `sources` → `model` (the index) → `sync` → `reconciler` →
//! `datapath`; `agent` wires them together.
pub mod agent;
pub mod datapath;
pub mod health;
pub mod list;
pub mod metrics;
pub mod model;
pub mod reconciler;
pub mod sources;
pub mod status;
pub mod sync;
pub mod trace;
