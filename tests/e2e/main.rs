//! End-to-end tests: run the real `fam-cli` binary, with its plugins loaded dynamically, on
//! the committed MobileNetV2 ImageNet weights and sample photos. One binary, split by topic.

mod architecture;
mod bad_input;
mod bench;
mod cli;
mod docs;
mod eval;
mod fewshot;
mod index;
mod interrupt;
mod pair;
mod plugins;
mod report;
mod retrieval;
mod shard;
mod util;
mod validate;
mod walkthrough;
