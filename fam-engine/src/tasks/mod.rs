//! The tasks a pipeline can run, one module each behind the [`Task`] trait. The run
//! ([`crate::run`]) orchestrates: it builds the task from the pipeline's `[task]` section with
//! [`task_of`], runs it with a [`TaskContext`], then renders what it returns.

mod classify;
mod context;
mod few_shot;
mod labelled;
mod pair;
mod retrieval;

pub use classify::Classify;
pub use context::{image_records, Task, TaskContext, TaskOutput, UniqueIds};
pub use few_shot::FewShot;
pub use pair::Pair;
pub use retrieval::Retrieval;

use crate::pipeline::TaskSection;

/// The task a pipeline's `[task]` section describes.
pub fn task_of(section: &TaskSection) -> Box<dyn Task> {
    match section.clone() {
        TaskSection::Pair { pairs } => Box::new(Pair { pairs }),
        TaskSection::Retrieval {
            queries,
            gallery,
            index,
            top_k,
            exclude_self,
            cache,
            cache_dir,
        } => Box::new(Retrieval {
            queries,
            gallery,
            index,
            top_k,
            exclude_self,
            cache,
            cache_dir,
        }),
        TaskSection::FewShot {
            support,
            query,
            all_classes,
            transform,
            contrast,
        } => Box::new(FewShot {
            support,
            query,
            all_classes,
            transform,
            contrast,
        }),
        TaskSection::Classify {
            bank,
            queries,
            method,
            k,
            transform,
        } => Box::new(Classify {
            bank,
            queries,
            method,
            k,
            transform,
        }),
    }
}
