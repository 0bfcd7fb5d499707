//! Where Kubernetes objects come from. Sources only collect objects; the
//! decisions live in [`crate::model`].
pub mod dir_watch;
pub mod kube;
pub mod manifest;
pub mod node;
