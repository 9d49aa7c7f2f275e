//! The cowsnap image, format v1: see [`types`] for the layout and data model.
//! This module owns reading, writing and validating images; it never touches
//! a live process.

pub mod types;
