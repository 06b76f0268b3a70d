//! A mutation fuzzer for the parsers that read untrusted input, on the stable toolchain
//! (cargo-fuzz needs nightly, which this project's machines cannot fetch):
//!
//! ```text
//! cargo run --release -p fam-core --example fuzz -- TARGET [SECONDS] [SEED]
//! ```
//!
//! Targets: `pipeline` (TOML parsing and validation), `checkpoint` (the restricted pickle
//! reader for zip and legacy `.pth`, and safetensors), `image` (decoding within the limits,
//! resize and crop). Inputs are seeds from `fuzz/corpus/<target>/`, mutated (bit flips,
//! byte overwrites with boundary values, inserted, deleted and duplicated runs, splices of
//! two seeds, truncation). An input that panics is a crash: it is saved to
//! `fuzz/crashes/<target>-crash-<hash>` and reported. An input that takes over a second is
//! saved as slow. The last line gives the number of executions, crashes and slow inputs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fam_core::pipeline::LoadedPipeline;
use fam_core::plugin::PluginHost;
use fam_core::traits::InputSpec;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    u64::MAX,
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], input: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(8) {
        let len = input.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                input[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                // A boundary value, little- or big-endian, 1 to 8 bytes wide.
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let w = 1 << rng.below(4);
                let bytes = if rng.below(2) == 0 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                let i = rng.below(len);
                for (k, b) in bytes.iter().take(w).enumerate() {
                    if i + k < len {
                        input[i + k] = *b;
                    }
                }
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let fill: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                input.splice(i..i, fill);
            }
            4 if len > 1 => {
                let i = rng.below(len);
                let n = (1 + rng.below(32)).min(len - i);
                input.drain(i..i + n);
            }
            5 if len > 1 => {
                let i = rng.below(len);
                let n = (1 + rng.below(64)).min(len - i);
                let chunk = input[i..i + n].to_vec();
                let j = rng.below(len);
                input.splice(j..j, chunk);
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let cut = rng.below(len + 1);
                    let from = rng.below(other.len());
                    input.truncate(cut);
                    input.extend_from_slice(&other[from..]);
                }
            }
            _ if len > 0 => input.truncate(rng.below(len)),
            _ => input.push(rng.next() as u8),
        }
    }
    input.truncate(1 << 20);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| {
        eprintln!("usage: fuzz pipeline|checkpoint|image [SECONDS] [SEED]");
        std::process::exit(2)
    });
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng(seed | 1);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = root.join("corpus").join(&target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .filter_map(|e| e.ok())
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    seeds.sort();
    let mut host = PluginHost::new(&[]);
    let spec = InputSpec::imagenet();
    let name = PathBuf::from(format!("fuzz-input.{target}"));
    let mut run = |data: &[u8]| match target.as_str() {
        "pipeline" => {
            let text = String::from_utf8_lossy(data);
            if let Ok(p) = LoadedPipeline::parse(&name, &text) {
                let _ = p.validate(&mut host, None);
            }
        }
        "checkpoint" => {
            let _ = fam_core::weights::state_dict_from_bytes(data, &name);
        }
        "image" => {
            if let Ok(img) = fam_core::preprocess::decode_rgb8(data, &name) {
                let _ = fam_core::preprocess::prepare(&img, &spec);
            }
        }
        other => {
            eprintln!("unknown target `{other}` (pipeline, checkpoint, image)");
            std::process::exit(2)
        }
    };
    std::panic::set_hook(Box::new(|_| {}));
    let crashes_dir = root.join("crashes");
    let (mut execs, mut crashes, mut slow) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut input = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        input.clear();
        input.extend_from_slice(&seeds[rng.below(seeds.len())]);
        mutate(&mut rng, &seeds, &mut input);
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&input)));
        execs += 1;
        let kind = if outcome.is_err() {
            crashes += 1;
            Some("crash")
        } else if t.elapsed() > Duration::from_secs(1) {
            slow += 1;
            Some("slow")
        } else {
            None
        };
        if let Some(kind) = kind {
            let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
            });
            std::fs::create_dir_all(&crashes_dir).unwrap();
            let path = crashes_dir.join(format!("{target}-{kind}-{hash:016x}"));
            std::fs::write(&path, &input).unwrap();
            eprintln!(
                "{kind}: {} ({} bytes, {:?})",
                path.display(),
                input.len(),
                t.elapsed()
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{target}: {execs} executions in {secs:.0} s ({:.0}/s), {crashes} crashes, {slow} slow inputs",
        execs as f64 / secs
    );
    if crashes > 0 {
        std::process::exit(1);
    }
}
