//! The gallery index: a retrieval gallery embedded once, in parts, and searched in bounded
//! memory (docs/architecture.md, "The gallery index").
//!
//! `fam-cli index PIPELINE --shard K/N` embeds part K of the gallery's listing (the same
//! contiguous split as `run --shard`) and writes three files to the index folder:
//!
//! - `part-K-of-N.f32.npy`: the embeddings, `[rows, dims]` little-endian f32 in C order,
//!   data 64-byte aligned (memory-mapped by the search, readable by `numpy.load`);
//! - `part-K-of-N.items.jsonl`: one JSON line per row: the file's place in the listing, its
//!   path, size and sha256, and how many files before it in the listing share its name
//!   (so that a hit's id is the one a plain run gives it, without reading every line);
//! - `part-K-of-N.json`, written last (its presence means the part is complete): the
//!   [`PartHeader`]: the model fingerprint, the listing it split, its range, the files that
//!   failed, and the part's counts and timings (its manifest).
//!
//! Parts from many machines form one index by being placed in one folder.
//! [`open`] checks that they are one complete set built with one model over one listing;
//! [`check`] also reports files that changed since they were indexed.

mod build;
mod format;
pub mod kernel;
mod open;
pub mod search;

pub use build::{build_part, BuildReport};
pub use format::{
    listing_sha256, part_files, read_headers, set_problems, Item, Listing, ModelFingerprint,
    PartHeader, FORMAT, VERSION,
};
pub use open::{check, CheckReport, Index};
