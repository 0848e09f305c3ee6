//! Metering: what each response cost, read alongside the bytes as they pass.

pub mod usage;
