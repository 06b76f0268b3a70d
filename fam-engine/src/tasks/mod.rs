//! The tasks a pipeline can run.

pub mod few_shot;
pub mod retrieval;
