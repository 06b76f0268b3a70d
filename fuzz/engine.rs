//! The mutation engine shared by the fuzz targets (`fam-core/examples/fuzz.rs`,
//! `fam-plugins/onnx/examples/fuzz.rs`), included with `#[path]`: seeds from
//! `fuzz/corpus/<target>/`, mutated (bit flips, byte overwrites with boundary values,
//! inserted, deleted and duplicated runs, splices of two seeds, truncation); an input that
//! panics is saved to `fuzz/crashes/<target>-crash-<hash>`, one that takes over a second as
//! `<target>-slow-<hash>`.

use std::path::Path;
use std::time::{Duration, Instant};

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `TARGET [SECONDS] [SEED]` from the command line.
pub fn args(targets: &str) -> (String, u64, u64) {
    let mut args = std::env::args().skip(1);
    let target = args.next().unwrap_or_else(|| {
        eprintln!("usage: fuzz {targets} [SECONDS] [SEED]");
        std::process::exit(2)
    });
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let seed: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    (target, seconds, seed)
}

/// The seeds of a target.
pub fn seeds(root: &Path, target: &str) -> Vec<Vec<u8>> {
    let corpus = root.join("corpus").join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .filter_map(|e| e.ok())
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    seeds.sort();
    seeds
}

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

/// Mutates seeds and runs `run` on each input for `seconds`; prints the executions, crashes
/// and slow inputs, and exits 1 if anything crashed.
pub fn fuzz(root: &Path, target: &str, seconds: u64, seed: u64, run: &mut dyn FnMut(&[u8])) {
    let seeds = seeds(root, target);
    let mut rng = Rng(seed | 1);
    // Keep where the last panic happened, to print it with the crash.
    std::panic::set_hook(Box::new(|info| {
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg} at {at}"));
    }));
    let crashes_dir = root.join("crashes");
    let (mut execs, mut crashes, mut slow) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut input = Vec::new();
    let mut seen = std::collections::HashSet::new();
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
        // One file per distinct panic site (the fuzzer finds the same bug many times).
        let kind = match kind {
            Some("crash") => {
                let why = LAST_PANIC.with(|p| p.borrow().clone());
                let site = why.rsplit(" at ").next().unwrap_or_default().to_string();
                seen.insert(site).then_some("crash")
            }
            k => k,
        };
        if let Some(kind) = kind {
            let hash = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
            });
            std::fs::create_dir_all(&crashes_dir).unwrap();
            let path = crashes_dir.join(format!("{target}-{kind}-{hash:016x}"));
            std::fs::write(&path, &input).unwrap();
            let why = if kind == "crash" {
                LAST_PANIC.with(|p| p.borrow().clone())
            } else {
                String::new()
            };
            eprintln!(
                "{kind}: {} ({} bytes, {:?}) {why}",
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
